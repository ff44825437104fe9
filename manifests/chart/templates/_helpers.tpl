{{- define "accord.name" -}}{{ .Release.Name }}{{- end -}}
{{- define "accord.labels" -}}
app.kubernetes.io/name: accord
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "accord.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
{{- define "accord.webhookService" -}}{{ include "accord.name" . }}-webhook{{- end -}}
{{- define "accord.certSecret" -}}{{ include "accord.name" . }}-webhook-tls{{- end -}}
{{- define "accord.natsUrl" -}}
{{- if and .Values.nats.deploy (not .Values.nats.url) -}}
nats://{{ include "accord.name" . }}-nats.{{ .Release.Namespace }}.svc:4222
{{- else -}}
{{ .Values.nats.url }}
{{- end -}}
{{- end -}}
{{- define "accord.env" -}}
- name: ACCORD_SIDECAR_IMAGE
  value: {{ .Values.sidecar.image | quote }}
- name: ACCORD_NATIVE_SIDECARS
  value: {{ .Values.sidecar.nativeSidecars | quote }}
- name: ACCORD_NATS_URL
  value: {{ include "accord.natsUrl" . | quote }}
- name: ACCORD_STREAM_MAX_AGE_S
  value: {{ .Values.nats.stream.maxAgeSeconds | int64 | quote }}
- name: ACCORD_STREAM_MAX_BYTES
  value: {{ .Values.nats.stream.maxBytes | int64 | quote }}
- name: ACCORD_STREAM_REPLICAS
  value: {{ .Values.nats.stream.replicas | int64 | quote }}
- name: ACCORD_STREAM_STORAGE
  value: {{ .Values.nats.stream.storage | quote }}
- name: ACCORD_NEW_SUBSCRIPTIONS_START
  value: {{ .Values.nats.newSubscriptionsStart | quote }}
- name: ACCORD_NAMESPACES
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: ACCORD_PARTICIPANT_AUDIENCE
  value: {{ .Values.participants.audience | default "accord.dev/participant" | quote }}
- name: ACCORD_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: ACCORD_OPERATOR_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
{{- end -}}
