{{/* The prefix of every object name: the release name, plus the chart
name unless the release name already contains it (release "sluice" gives
"sluice-proxy", release "edge" gives "edge-sluice-proxy"). */}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sluice.proxy.name" -}}
{{- printf "%s-proxy" (include "sluice.fullname" .) -}}
{{- end -}}

{{- define "sluice.ingress.name" -}}
{{- printf "%s-ingress" (include "sluice.fullname" .) -}}
{{- end -}}

{{- define "sluice.proxy.serviceAccountName" -}}
{{- default (include "sluice.proxy.name" .) .Values.proxy.serviceAccount.name -}}
{{- end -}}

{{- define "sluice.ingress.serviceAccountName" -}}
{{- default (include "sluice.ingress.name" .) .Values.ingress.serviceAccount.name -}}
{{- end -}}

{{/* Labels that select a component's Pods; they never change across
upgrades, as a Deployment's and a DaemonSet's selector cannot. */}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ default .root.Chart.Name .root.Values.nameOverride }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sluice.labels" -}}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sluice.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
