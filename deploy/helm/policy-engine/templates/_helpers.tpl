{{/* The chart name, or nameOverride. */}}
{{- define "policy-engine.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name of every object: fullnameOverride, or release-chart (the release name alone
when it already holds the chart name). */}}
{{- define "policy-engine.fullname" -}}
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

{{- define "policy-engine.selectorLabels" -}}
app.kubernetes.io/name: {{ include "policy-engine.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "policy-engine.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "policy-engine.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "policy-engine.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "policy-engine.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The kernel config with the chart's addresses. */}}
{{- define "policy-engine.kernelConfig" -}}
{{- $cfg := deepCopy .Values.kernel.config }}
{{- $pk := get $cfg "policy_kernel" | default dict }}
{{- $server := get $pk "server" | default dict }}
{{- $_ := set $server "address" .Values.kernel.extProc.address }}
{{- $_ := set $server "port" .Values.kernel.extProc.port }}
{{- $_ := set $pk "server" $server }}
{{- $obs := get $pk "observability" | default dict }}
{{- $_ := set $obs "metrics_address" .Values.kernel.metrics.address }}
{{- $_ := set $obs "metrics_port" .Values.kernel.metrics.port }}
{{- $_ := set $obs "admin_address" .Values.kernel.admin.address }}
{{- $_ := set $obs "admin_port" .Values.kernel.admin.port }}
{{- $_ := set $pk "observability" $obs }}
{{- $_ := set $cfg "policy_kernel" $pk }}
{{- toYaml $cfg }}
{{- end }}

{{/* The agent config with the chart's metrics and admin addresses. */}}
{{- define "policy-engine.agentConfig" -}}
{{- $cfg := deepCopy .Values.agent.config }}
{{- $ac := get $cfg "agent_core" | default dict }}
{{- $obs := get $ac "observability" | default dict }}
{{- $_ := set $obs "metrics_address" (printf "%s:%v" .Values.agent.metrics.address .Values.agent.metrics.port) }}
{{- $_ := set $obs "admin_address" (printf "%s:%v" .Values.agent.admin.address .Values.agent.admin.port) }}
{{- $_ := set $ac "observability" $obs }}
{{- $_ := set $cfg "agent_core" $ac }}
{{- toYaml $cfg }}
{{- end }}
