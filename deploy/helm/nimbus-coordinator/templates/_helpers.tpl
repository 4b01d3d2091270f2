{{/*
Names, labels and the checks every template shares.
*/}}

{{/* The chart name (nameOverride wins). */}}
{{- define "nimbus-coordinator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/*
The name prefix of every resource, at most 52 characters: the StatefulSet's controller-revision-hash label adds
11 characters to it and must stay within 63; pods and per-replica Services append -N.
*/}}
{{- define "nimbus-coordinator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nimbus-coordinator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the coordinator's pods (stable across upgrades: never add to these). */}}
{{- define "nimbus-coordinator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nimbus-coordinator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: coordinator
{{- end }}

{{- define "nimbus-coordinator.labels" -}}
helm.sh/chart: {{ include "nimbus-coordinator.chart" . }}
{{ include "nimbus-coordinator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: polynimbus
{{- end }}

{{- define "nimbus-coordinator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "nimbus-coordinator.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "nimbus-coordinator.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{/* `IP:PORT` for a listener on .Values.listenAddress (IPv6 in brackets). Call with (list $ port). */}}
{{- define "nimbus-coordinator.listen" -}}
{{- $root := index . 0 }}
{{- $addr := $root.Values.listenAddress }}
{{- if contains ":" $addr }}
{{- printf "[%s]:%d" $addr (int (index . 1)) }}
{{- else }}
{{- printf "%s:%d" $addr (int (index . 1)) }}
{{- end }}
{{- end }}

{{/*
The checks the schema cannot express. Each `fail` says what is wrong and what to set. Included by the
ConfigMap and the StatefulSet, so nothing renders with values that cannot work.
*/}}
{{- define "nimbus-coordinator.validate" -}}
{{- $fullname := include "nimbus-coordinator.fullname" . }}
{{- $replicas := int .Values.replicas }}
{{- if and (gt $replicas 1) (empty .Values.etcd.endpoints) }}
{{- fail (printf "replicas is %d but etcd.endpoints is empty: the default store (sled) allows a single writer, so more than one replica needs etcd; set etcd.endpoints, or replicas: 1" $replicas) }}
{{- end }}
{{- if and .Values.etcd.endpoints (not .Values.kek.existingSecret) }}
{{- fail (printf "etcd.endpoints is set but kek.existingSecret is empty: on etcd the coordinator seals the shared CA and each replica's WireGuard key with a key-encryption key and refuses to start without one; create it once with `nimbus-coordinator kek generate kek.b64` and `kubectl -n %s create secret generic %s-kek --from-file=kek=kek.b64`, then set kek.existingSecret: %s-kek (README.md, \"etcd and HA\")" .Release.Namespace $fullname $fullname) }}
{{- end }}
{{- if and .Values.etcd.tlsSecretName (empty .Values.etcd.endpoints) }}
{{- fail "etcd.tlsSecretName is set but etcd.endpoints is empty: give the etcd client URLs too, or remove etcd.tlsSecretName" }}
{{- end }}
{{- $seen := dict }}
{{- range $i := until $replicas }}
{{- $ep := dict }}
{{- if lt $i (len $.Values.replicaEndpoints) }}
{{- $ep = index $.Values.replicaEndpoints $i }}
{{- end }}
{{- if not $ep.advertiseAddress }}
{{- fail (printf "replica %s-%d has no advertise address: set replicaEndpoints[%d].advertiseAddress to the IP agents dial for it (its Service's external address); one entry per replica" $fullname $i $i) }}
{{- end }}
{{- if hasKey $seen $ep.advertiseAddress }}
{{- fail (printf "replicas %s-%s and %s-%d share the advertise address %s: every replica has its own WireGuard key and Service, so give each its own address" $fullname (get $seen $ep.advertiseAddress) $fullname $i $ep.advertiseAddress) }}
{{- end }}
{{- $_ := set $seen $ep.advertiseAddress (toString $i) }}
{{- end }}
{{- if gt (len .Values.replicaEndpoints) $replicas }}
{{- fail (printf "replicaEndpoints has %d entries but replicas is %d: remove the extra entries or raise replicas" (len .Values.replicaEndpoints) $replicas) }}
{{- end }}
{{- end }}
