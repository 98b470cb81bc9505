{{/* Labels on everything the chart renders. */}}
{{- define "natgw.labels" -}}
app.kubernetes.io/part-of: natgw
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* natgw's image reference. */}}
{{- define "natgw.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The cluster networks as a YAML list; rendering fails without them. */}}
{{- define "natgw.clusterNetworks" -}}
{{- if not .Values.clusterNetworks -}}
{{- fail "clusterNetworks is required: list the cluster's pod and service CIDRs (e.g. --set clusterNetworks={10.244.0.0/16,10.96.0.0/12})" -}}
{{- end -}}
{{ toYaml .Values.clusterNetworks }}
{{- end -}}
