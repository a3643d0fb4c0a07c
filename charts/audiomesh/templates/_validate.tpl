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
{{- $sepPods := or (include "audiomesh.autoscaled" (dict "ctx" . "component" "separation")) (gt (int $sep.replicaCount) 1) }}
{{- if and $cache.enabled (not $cache.existingClaim) (eq (len $cache.accessModes) 1) (has "ReadWriteOnce" $cache.accessModes) $sepPods }}
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
{{- $compile := $sep.compileCache }}
{{- if and $compile.enabled (not $compile.existingClaim) (eq (len $compile.accessModes) 1) (has "ReadWriteOnce" $compile.accessModes) $sepPods }}
{{- fail "separation.compileCache: separation runs several pods, but its new compile-cache volume is ReadWriteOnce (one node). Set separation.compileCache.accessModes=[ReadWriteMany], or an existingClaim that several nodes can mount." }}
{{- end }}
{{- /* Monitoring and autoscaling */}}
{{- $metrics := .Values.metrics }}
{{- range $component := list "orchestrator" "separation" "hpss" "composite" "normalize" "gateway" }}
{{- if and $metrics.enabled (eq (int $metrics.port) (int (index $.Values $component).port)) }}
{{- fail (printf "metrics: metrics.port=%v is also %s.port. Set metrics.port to a free port (9090 by default)." $metrics.port $component) }}
{{- end }}
{{- end }}
{{- range $what := list "serviceMonitor" "podMonitor" "dashboard" }}
{{- if and (index $metrics $what).enabled (not $metrics.enabled) }}
{{- fail (printf "metrics: metrics.%s.enabled=true needs the services' metrics. Set metrics.enabled=true." $what) }}
{{- end }}
{{- end }}
{{- if and $metrics.serviceMonitor.enabled $metrics.podMonitor.enabled }}
{{- fail "metrics: serviceMonitor and podMonitor both scrape every pod, so every series would be counted twice. Set metrics.serviceMonitor.enabled=false or metrics.podMonitor.enabled=false." }}
{{- end }}
{{- range $component := list "separation" "hpss" }}
{{- $v := index $.Values $component }}
{{- $keda := $v.autoscaling.keda }}
{{- if and $keda.enabled $v.autoscaling.enabled }}
{{- fail (printf "%s.autoscaling: the CPU HPA (enabled=true) and KEDA (keda.enabled=true) would both scale one Deployment and fight. Set %s.autoscaling.enabled=false to scale on backlog with KEDA, or %s.autoscaling.keda.enabled=false." $component $component $component) }}
{{- end }}
{{- if $keda.enabled }}
{{- if not $metrics.enabled }}
{{- fail (printf "%s.autoscaling.keda: KEDA reads the backlog from the services' metrics. Set metrics.enabled=true." $component) }}
{{- end }}
{{- if not $.Values.keda.serverAddress }}
{{- fail (printf "%s.autoscaling.keda: no Prometheus to query. Set keda.serverAddress (e.g. http://prometheus-operated.monitoring.svc:9090) to the Prometheus that scrapes this release." $component) }}
{{- end }}
{{- if gt (int $keda.minReplicas) (int $keda.maxReplicas) }}
{{- fail (printf "%s.autoscaling.keda: minReplicas (%v) is above maxReplicas (%v)." $component $keda.minReplicas $keda.maxReplicas) }}
{{- end }}
{{- /* From zero pods, a job's node calls an absent worker and fails after unavailableBudgetSeconds. */}}
{{- $startup := add (mul $v.startupProbe.periodSeconds $v.startupProbe.failureThreshold) $keda.pollingInterval }}
{{- if and (eq (int $keda.minReplicas) 0) (lt (int $.Values.config.unavailableBudgetSeconds) (int $startup)) }}
{{- fail (printf "%s.autoscaling.keda: minReplicas=0 scales to zero, but a job's first call then waits for a pod to start: up to pollingInterval (%v s) + its startup probe (%v s), while config.unavailableBudgetSeconds=%v fails the call sooner. Set config.unavailableBudgetSeconds=%v or more (add your node autoscaler's time), or minReplicas=1." $component $keda.pollingInterval (mul $v.startupProbe.periodSeconds $v.startupProbe.failureThreshold) $.Values.config.unavailableBudgetSeconds $startup) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.networkPolicy.enabled .Values.ingress.enabled (not .Values.networkPolicy.gateway.from) }}
{{- fail "networkPolicy: with ingress.enabled the gateway should take calls from the ingress controller only. Set networkPolicy.gateway.from to its pods, e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ingress-nginx}}}] (or [{namespaceSelector: {}}] for any pod in the cluster)." }}
{{- end }}
{{- end }}
