{{/* Names, labels, the watched namespaces and the RBAC rules, shared by every template. */}}

{{- define "mergesearch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mergesearch.fullname" -}}
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

{{- define "mergesearch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mergesearch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mergesearch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mergesearch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: mergesearch
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mergesearch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mergesearch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces watched when not watching all, as a JSON list (release namespace by default). */}}
{{- define "mergesearch.watchedNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- .Values.watch.namespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{- define "mergesearch.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}

{{/*
Every permission the operator uses, where searches live: a Role per watched namespace, or one ClusterRole
when it watches all. All of it is namespaced (kopf's CRD scanning is off, so it needs no cluster-scoped
rule). Equal to mergesearch_operator.k8s.permissions.RULES: tests/install compares them.
*/}}
{{- define "mergesearch.namespacedRules" -}}
- apiGroups: [mergesearch.io]
  resources: [mergesearches]
  verbs: [get, list, watch, patch]
- apiGroups: [mergesearch.io]
  resources: [mergesearches/status]
  verbs: [get, patch]
- apiGroups: [mergesearch.io]
  resources: [mergesearches/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]  # create: the token of a search's worker pods (trial.reusePods)
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end }}
