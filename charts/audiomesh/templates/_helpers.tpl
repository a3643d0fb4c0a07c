{{/*
Names, labels and addresses shared by the templates. Kubernetes names are cut to 63 characters.
*/}}

{{- define "audiomesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "audiomesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "audiomesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The services, in start order, and which of them are workers (headless Services, dns:/// + round_robin). */}}
{{- define "audiomesh.grpcServices" -}}
orchestrator separation hpss composite normalize
{{- end }}
{{- define "audiomesh.workers" -}}
separation hpss composite normalize
{{- end }}

{{- define "audiomesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "audiomesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "audiomesh.labels" -}}
helm.sh/chart: {{ include "audiomesh.chart" . }}
{{ include "audiomesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: audiomesh
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* (dict "ctx" $ "component" "separation") */}}
{{- define "audiomesh.componentName" -}}
{{- printf "%s-%s" (include "audiomesh.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "audiomesh.componentSelectorLabels" -}}
{{ include "audiomesh.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "audiomesh.componentLabels" -}}
{{ include "audiomesh.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The Service that clients dial: headless for workers, ClusterIP for the orchestrator and gateway. */}}
{{- define "audiomesh.serviceName" -}}
{{- if has .component (splitList " " (include "audiomesh.workers" .ctx)) }}
{{- printf "%s-%s-headless" (include "audiomesh.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- include "audiomesh.componentName" . }}
{{- end }}
{{- end }}

{{/* AUDIOMESH_<NAME>_ADDR: a fully qualified name (both gRPC resolvers agree on it); dns:/// for workers. */}}
{{- define "audiomesh.address" -}}
{{- $values := index .ctx.Values .component }}
{{- $host := printf "%s.%s.svc.%s" (include "audiomesh.serviceName" .) .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- if has .component (splitList " " (include "audiomesh.workers" .ctx)) }}
{{- printf "dns:///%s:%v" $host $values.port }}
{{- else }}
{{- printf "%s:%v" $host $values.port }}
{{- end }}
{{- end }}

{{- define "audiomesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "audiomesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "audiomesh.secretName" -}}
{{- default (printf "%s-secrets" (include "audiomesh.fullname" .) | trunc 63 | trimSuffix "-") .Values.secrets.existingSecret }}
{{- end }}

{{/* image reference; a service may override repository and tag (e.g. a CUDA build for separation). */}}
{{- define "audiomesh.image" -}}
{{- $override := default dict (index .ctx.Values .component).image }}
{{- $repository := default .ctx.Values.image.repository $override.repository }}
{{- $tag := default (default .ctx.Chart.AppVersion .ctx.Values.image.tag) $override.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "audiomesh.storeEndpoint" -}}
{{- if .Values.store.bundled.enabled }}
{{- printf "%s.%s.svc.%s:%v" (include "audiomesh.componentName" (dict "ctx" . "component" "s3")) .Release.Namespace .Values.clusterDomain .Values.store.bundled.port }}
{{- else }}
{{- .Values.store.s3.endpoint }}
{{- end }}
{{- end }}

{{- define "audiomesh.storeUrl" -}}
{{- if .Values.store.prefix }}
{{- printf "s3://%s/%s" .Values.store.bucket (trimAll "/" .Values.store.prefix) }}
{{- else }}
{{- printf "s3://%s" .Values.store.bucket }}
{{- end }}
{{- end }}

{{- define "audiomesh.modelCacheClaim" -}}
{{- default (printf "%s-models" (include "audiomesh.fullname" .) | trunc 63 | trimSuffix "-") .Values.modelCache.persistence.existingClaim }}
{{- end }}

{{/* Credentials from the Secret, as env entries; every key is optional (an existing Secret may
hold a subset). The services get the server side; the client key (api-key) goes to `helm test` only. */}}
{{- define "audiomesh.secretEnv" -}}
{{- $secret := include "audiomesh.secretName" . }}
{{- range $env, $key := dict "AUDIOMESH_S3_ACCESS_KEY" "s3-access-key" "AUDIOMESH_S3_SECRET_KEY" "s3-secret-key" "AUDIOMESH_API_KEYS" "api-keys" "AUDIOMESH_SERVICE_TOKEN" "service-token" }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end }}

{{/* Scaled by an HPA (CPU) or a KEDA ScaledObject (backlog): the Deployment leaves replicas to it. */}}
{{- define "audiomesh.autoscaled" -}}
{{- $values := index .ctx.Values .component }}
{{- if hasKey $values "autoscaling" }}
{{- if or $values.autoscaling.enabled $values.autoscaling.keda.enabled }}true{{ end }}
{{- end }}
{{- end }}

{{/* The label on every pod that serves /metrics: the metrics Service, PodMonitor and NetworkPolicy select by it. */}}
{{- define "audiomesh.metricsLabel" -}}
audiomesh.io/metrics: "true"
{{- end }}

{{/* KEDA's PromQL for a stage's backlog: its nodes waiting (every worker slot busy) or running in this
release's orchestrators (not "held": those wait for their job's own node limit, which more pods do not lift)
(audiomesh_nodes, audiomesh.metrics.JobsCollector: every stage always has a series, so no result at
all means no orchestrator is scraped, which KEDA reports as an error rather than a backlog of 0),
summed over the replicas. Separation adds queued jobs: each becomes a separation node once planned,
and planning asks a separation pod, so from zero pods they are the only sign of work. */}}
{{- define "audiomesh.kedaQuery" -}}
{{- $keda := (index .ctx.Values .component).autoscaling.keda }}
{{- if $keda.query }}
{{- $keda.query }}
{{- else }}
{{- $orchestrator := include "audiomesh.componentName" (dict "ctx" .ctx "component" "orchestrator") }}
{{- $series := printf "namespace=%q,pod=~%q" .ctx.Release.Namespace (printf "%s-.+" $orchestrator) }}
{{- $nodes := printf "sum(audiomesh_nodes{stage=%q,state!=\"held\",%s})" .component $series }}
{{- if eq .component "separation" }}
{{- printf "sum(audiomesh_jobs{state=\"queued\",%s}) + %s" $series $nodes }}
{{- else }}
{{- $nodes }}
{{- end }}
{{- end }}
{{- end }}

{{/* priorityClassName and topologySpreadConstraints of a service's pod spec (nindent 6), the
service's own or the top-level defaults; a constraint without a labelSelector selects this service's pods. */}}
{{- define "audiomesh.scheduling" -}}
{{- $values := index .ctx.Values .component }}
{{- with default .ctx.Values.priorityClassName $values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with default .ctx.Values.topologySpreadConstraints $values.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range . }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "audiomesh.componentSelectorLabels" $ | fromYaml)) }}
{{- end }}
  - {{- toYaml $constraint | nindent 4 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "audiomesh.compileCacheClaim" -}}
{{- default (printf "%s-compile-cache" (include "audiomesh.fullname" .) | trunc 63 | trimSuffix "-") .Values.separation.compileCache.existingClaim }}
{{- end }}
