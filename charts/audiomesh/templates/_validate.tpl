{{/*
Cross-value checks, included by configmap.yaml (so by every install, upgrade and template).
Each message says what to set. values.schema.json checks each value on its own.
*/}}
{{- define "audiomesh.validate" -}}
{{- $store := .Values.store }}
{{- if and (not $store.bundled.enabled) (not $store.s3.endpoint) }}
{{- fail "store: no object store. Set store.s3.endpoint (host:port of your S3/MinIO) or store.bundled.enabled=true." }}
{{- end }}
{{- if and $store.bundled.enabled $store.s3.endpoint }}
{{- fail (printf "store: store.s3.endpoint=%s and store.bundled.enabled=true both choose a store. Set store.bundled.enabled=false to use %s, or clear store.s3.endpoint." $store.s3.endpoint $store.s3.endpoint) }}
{{- end }}
{{- if and $store.bundled.enabled $store.s3.secure }}
{{- fail "store: the bundled store speaks plain HTTP inside the cluster. Set store.s3.secure=false, or use your own TLS endpoint in store.s3.endpoint." }}
{{- end }}
{{- $s3Keys := and .Values.secrets.s3AccessKey .Values.secrets.s3SecretKey }}
{{- if and (not $store.bundled.enabled) (not .Values.secrets.existingSecret) (not $s3Keys) }}
{{- fail (printf "secrets: the S3 endpoint %s needs credentials. Set secrets.s3AccessKey and secrets.s3SecretKey, or secrets.existingSecret (keys s3-access-key, s3-secret-key)." $store.s3.endpoint) }}
{{- end }}
{{- $sep := .Values.separation }}
{{- $cache := .Values.modelCache.persistence }}
{{- if and $cache.enabled (not $cache.existingClaim) (eq (len $cache.accessModes) 1) (has "ReadWriteOnce" $cache.accessModes) (or $sep.autoscaling.enabled (gt (int $sep.replicaCount) 1)) }}
{{- fail "modelCache: separation runs several pods, but its new model-cache volume is ReadWriteOnce (one node). Set modelCache.persistence.accessModes=[ReadWriteMany], or an existingClaim that several nodes can mount." }}
{{- end }}
{{- if and $sep.gpu.enabled (eq $sep.device "cpu") }}
{{- fail "separation: gpu.enabled=true but device=cpu would leave the GPU idle. Set separation.device=cuda (or auto)." }}
{{- end }}
{{- if and (eq $sep.device "cuda") (not $sep.gpu.enabled) }}
{{- fail "separation: device=cuda needs a GPU. Set separation.gpu.enabled=true (and tolerations/nodeSelector for your GPU nodes)." }}
{{- end }}
{{- range $component := list "separation" "hpss" }}
{{- $as := (index $.Values $component).autoscaling }}
{{- if and $as.enabled (gt (int $as.minReplicas) (int $as.maxReplicas)) }}
{{- fail (printf "%s.autoscaling: minReplicas (%v) is above maxReplicas (%v)." $component $as.minReplicas $as.maxReplicas) }}
{{- end }}
{{- end }}
{{- range $component := list "orchestrator" "separation" "hpss" "composite" "normalize" }}
{{- $v := index $.Values $component }}
{{- $needed := add $.Values.preStopSleepSeconds $v.drainSeconds 10 }}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "%s: terminationGracePeriodSeconds=%v would kill the pod while it drains: it must cover preStopSleepSeconds (%v) + %s.drainSeconds (%v) + 10 s to exit. Set %s.terminationGracePeriodSeconds=%v or more (or lower %s.drainSeconds)." $component $v.terminationGracePeriodSeconds $.Values.preStopSleepSeconds $component $v.drainSeconds $component $needed $component) }}
{{- end }}
{{- end }}
{{- if lt (int .Values.gateway.terminationGracePeriodSeconds) (int (add .Values.preStopSleepSeconds 30)) }}
{{- fail (printf "gateway: terminationGracePeriodSeconds=%v must cover preStopSleepSeconds (%v) + the gateway's 20 s drain + 10 s to exit. Set gateway.terminationGracePeriodSeconds=%v or more." .Values.gateway.terminationGracePeriodSeconds .Values.preStopSleepSeconds (add .Values.preStopSleepSeconds 30)) }}
{{- end }}
{{- if and .Values.modelCache.offline (not .Values.modelCache.persistence.enabled) }}
{{- fail "modelCache: offline=true with no volume means separation never has weights (only the built-in demucs_unittest). Set modelCache.persistence.enabled=true (existingClaim holding the .th/.yaml files)." }}
{{- end }}
{{- if and .Values.modelCache.readOnly (not .Values.modelCache.offline) }}
{{- fail "modelCache: readOnly=true leaves nowhere to download weights. Set modelCache.offline=true (the weights are on the volume already) or readOnly=false." }}
{{- end }}
{{- end }}
