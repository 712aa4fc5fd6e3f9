{{/* Names are cut to 63 characters: the limit of a Kubernetes label value and DNS label. */}}
{{- define "sd-triton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sd-triton.fullname" -}}
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

{{- define "sd-triton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sd-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sd-triton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sd-triton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sd-triton.adminKeySecretName" -}}
{{- default (printf "%s-admin-key" (include "sd-triton.fullname" .)) .Values.server.adminKeySecret.name }}
{{- end }}

{{- /* The gateway's API key: in a Secret of yours, or in the chart's own (named for the admin key,
which it held first). */}}
{{- define "sd-triton.apiKeySecretName" -}}
{{- default (printf "%s-admin-key" (include "sd-triton.fullname" .)) .Values.gateway.apiKeySecret.name }}
{{- end }}

{{/*
The APIs behind the admin key: the same list as the local launcher's (utils/server/access.py).
*/}}
{{- define "sd-triton.restrictedApis" -}}
model-repository,shared-memory,logging,trace,statistics:admin-key=$(TRITON_ADMIN_KEY)
{{- end }}

{{/*
The per-pod series the HorizontalPodAutoscaler reads. Its owner is files/recording-rules.yml
(the rule that records it); prometheus-adapter serves it under this same name, and a test
checks that the three agree.
*/}}
{{- define "sd-triton.autoscalingMetric" -}}
namespace_pod:nv_inference_queue_per_compute:max_ratio_rate1m
{{- end }}
