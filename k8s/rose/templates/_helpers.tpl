{{/* Names and labels. */}}
{{- define "rose.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rose.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "rose.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "rose.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rose.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "rose.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rose
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway") */}}
{{- define "rose.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rose.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "rose.image" -}}
{{ printf "%s:%s" .repository .tag }}
{{- end -}}

{{/* The Redis URL: the bundled StatefulSet's Service, or the external URL. */}}
{{- define "rose.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:%d/0" (include "rose.fullname" .) (int .Values.redis.port) -}}
{{- else -}}
{{- required "set redis.url (an external Redis), redis.existingSecret, or redis.enabled=true" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* ROSE_REDIS_URL as a container env entry (from a Secret when one is named). */}}
{{- define "rose.redisEnv" -}}
- name: ROSE_REDIS_URL
{{- if and .Values.redis.existingSecret (not .Values.redis.enabled) }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.secretKey }}
{{- else }}
  value: {{ include "rose.redisUrl" . | quote }}
{{- end }}
{{- end -}}

{{- define "rose.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.create -}}
{{- printf "%s-api-keys" (include "rose.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "rose.schedulerHost" -}}
{{- printf "%s-scheduler" (include "rose.fullname" .) -}}
{{- end -}}

{{/* Rolls pods when the shared ConfigMap changes. */}}
{{- define "rose.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end -}}
