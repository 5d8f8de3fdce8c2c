{{/* Names. fullname is kept short: StatefulSet pod names (NAME-POOL-ORDINAL) must fit 63. */}}
{{- define "moemesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moemesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "moemesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object name of a component: dict "root" $ "component" "expert" "pool" "default". */}}
{{- define "moemesh.componentName" -}}
{{- $base := printf "%s-%s" (include "moemesh.fullname" .root) .component -}}
{{- if .pool -}}{{- printf "%s-%s" $base .pool -}}{{- else -}}{{- $base -}}{{- end -}}
{{- end -}}

{{- define "moemesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moemesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- if .pool }}
moemesh.io/pool: {{ .pool }}
{{- end }}
{{- end -}}

{{- define "moemesh.labels" -}}
helm.sh/chart: {{ include "moemesh.chart" .root }}
{{ include "moemesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: moemesh
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata: of an object. dict "root" $ "component" C "pool" P "name" N ["labels" map] ["annotations" map] */}}
{{- define "moemesh.metadata" -}}
name: {{ .name }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "moemesh.labels" . | nindent 2 }}
  {{- with .labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $ann := merge (deepCopy (.annotations | default dict)) (deepCopy (.root.Values.commonAnnotations | default dict)) }}
{{- with $ann }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "moemesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moemesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moemesh.image" -}}
{{- $variant := ternary "cuda" "cpu" (eq .Values.accelerator "nvidia") -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $variant) -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (toString $tag) -}}
{{- end -}}
{{- end -}}

{{/* ZeroMQ endpoints. */}}
{{- define "moemesh.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{- define "moemesh.controlEndpoint" -}}
{{- printf "tcp://%s-router-control.%s:%d" (include "moemesh.fullname" .) (include "moemesh.svcDomain" .) (int .Values.router.controlPort) -}}
{{- end -}}

{{- define "moemesh.placementEndpoint" -}}
{{- printf "tcp://%s-router-control.%s:%d" (include "moemesh.fullname" .) (include "moemesh.svcDomain" .) (int .Values.router.placementPort) -}}
{{- end -}}

{{/* A StatefulSet pod's own endpoint: dict "root" $ "service" NAME "port" N (POD_NAME and POD_NAMESPACE from the Downward API). */}}
{{- define "moemesh.podEndpoint" -}}
{{- printf "tcp://$(POD_NAME).%s.$(POD_NAMESPACE).svc.%s:%d" .service .root.Values.clusterDomain (int .port) -}}
{{- end -}}

{{- define "moemesh.kvstoreEndpoint" -}}
{{- $svc := printf "%s-kvstore" (include "moemesh.fullname" .) -}}
{{- printf "tcp://%s-0.%s.%s:%d" $svc $svc (include "moemesh.svcDomain" .) (int .Values.kvstore.port) -}}
{{- end -}}

{{- define "moemesh.modelDir" -}}
{{- clean (printf "%s/%s" .Values.model.mountPath .Values.model.path) -}}
{{- end -}}

{{/* over merged into base, maps key by key; unlike mergeOverwrite, a zero value (0, "", false)
    in over wins. Returns YAML (read back with fromYaml). dict "base" MAP "over" MAP */}}
{{- define "moemesh.deepMerge" -}}
{{- $out := deepCopy (.base | default dict) -}}
{{- range $k, $v := (.over | default dict) -}}
{{- if and (kindIs "map" $v) (kindIs "map" (get $out $k)) -}}
{{- $_ := set $out $k (include "moemesh.deepMerge" (dict "base" (get $out $k) "over" $v) | fromYaml) -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* Expert pools with poolDefaults merged in, as a YAML list (read back with fromYamlArray). */}}
{{- define "moemesh.expertPools" -}}
{{- $pools := list -}}
{{- range $p := .Values.expert.pools -}}
{{- $pools = append $pools (include "moemesh.deepMerge" (dict "base" $.Values.expert.poolDefaults "over" $p) | fromYaml) -}}
{{- end -}}
{{- toYaml $pools -}}
{{- end -}}

{{/* Which autoscaler a pool gets: "keda", "hpa" or "" (none). dict "root" $ "pool" POOL */}}
{{- define "moemesh.autoscaler" -}}
{{- $a := .pool.autoscaling -}}
{{- $caps := .root.Capabilities.APIVersions -}}
{{- if $a.enabled -}}
{{- $keda := $caps.Has "keda.sh/v1alpha1" -}}
{{- $hpa := $caps.Has "autoscaling/v2" -}}
{{- if eq $a.provider "keda" -}}
{{- if not $keda -}}
{{- fail (printf "expert pool %q: autoscaling.provider is keda but the cluster has no keda.sh/v1alpha1 API (install KEDA, or use provider hpa/auto)" .pool.name) -}}
{{- end -}}
keda
{{- else if eq $a.provider "hpa" -}}
{{- if not $hpa -}}
{{- fail (printf "expert pool %q: autoscaling.provider is hpa but the cluster has no autoscaling/v2 API" .pool.name) -}}
{{- end -}}
hpa
{{- else if $keda -}}
keda
{{- else if and $hpa ($caps.Has "custom.metrics.k8s.io/v1beta1") -}}
hpa
{{- end -}}
{{- end -}}
{{- end -}}

{{/* --expert-hosts: router.expertHosts, or the pods of the coordinator-assigned pools. */}}
{{- define "moemesh.expertHosts" -}}
{{- if gt (int .Values.router.expertHosts) 0 -}}
{{- int .Values.router.expertHosts -}}
{{- else -}}
{{- $n := 0 -}}
{{- range $p := include "moemesh.expertPools" . | fromYamlArray -}}
{{- if not $p.experts -}}
{{- if include "moemesh.autoscaler" (dict "root" $ "pool" $p) -}}
{{- $n = add $n (int $p.autoscaling.minReplicas) -}}
{{- else -}}
{{- $n = add $n (int $p.replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- max $n 1 -}}
{{- end -}}
{{- end -}}

{{- define "moemesh.tenantsConfigured" -}}
{{- if or .Values.router.tenants.existingSecret .Values.router.tenants.content -}}true{{- end -}}
{{- end -}}

{{- define "moemesh.shmEnabled" -}}
{{- $s := toString .Values.shm.enabled -}}
{{- if or (eq $s "true") (and (eq $s "auto") (eq .Values.accelerator "nvidia")) -}}true{{- end -}}
{{- end -}}

{{/* The model volume and, for objectStorage, the init container that fills it. */}}
{{- define "moemesh.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.existingClaim | default (printf "%s-model" (include "moemesh.fullname" .)) }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.objectStorage.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "moemesh.modelInitContainer" -}}
{{- if eq .Values.model.source "objectStorage" }}
{{- $o := .Values.model.objectStorage }}
{{- if not $o.uri }}
{{- fail "model.source is objectStorage: set model.objectStorage.uri (e.g. s3://bucket/models/NAME/)" }}
{{- end }}
- name: fetch-model
  image: {{ $o.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    {{- toYaml $o.command | nindent 4 }}
  env:
    - name: MODEL_URI
      value: {{ $o.uri | quote }}
    - name: MODEL_DIR
      value: {{ include "moemesh.modelDir" . | quote }}
    - name: HOME
      value: /tmp
    {{- with $o.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $o.envFromSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  resources:
    {{- toYaml $o.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/*
The pod template every workload shares. dict:
  root, component, pool (or ""), cfg (the component's values), args (the service's own flags),
  ports (list of dict name/port), adminPort, gpu (true when the component takes GPUs),
  model (true when it mounts the checkpoint),
  volumes, mounts (extra lists), annotations (extra pod annotations).
*/}}
{{- define "moemesh.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $cfg := .cfg -}}
{{- $nvidia := and .gpu (eq $v.accelerator "nvidia") -}}
{{- $sel := dict "root" $root "component" .component "pool" .pool -}}
{{- $probes := include "moemesh.deepMerge" (dict "base" $v.probes "over" $cfg.probes) | fromYaml -}}
{{- $res := deepCopy ($cfg.resources | default dict) -}}
{{- if $res.requests }}{{- $_ := unset $res.requests "nvidia.com/gpu" -}}{{- end -}}
{{- if $res.limits }}{{- $_ := unset $res.limits "nvidia.com/gpu" -}}{{- end -}}
{{- if and $nvidia (gt (int $cfg.gpus) 0) -}}
{{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int $cfg.gpus)) ($res.limits | default dict)) -}}
{{- end -}}
{{- $podAnn := merge (deepCopy ($cfg.podAnnotations | default dict)) (deepCopy ($v.podAnnotations | default dict)) (deepCopy (.annotations | default dict)) -}}
{{- if $v.metrics.podAnnotations -}}
{{- $_ := set $podAnn "prometheus.io/scrape" "true" -}}
{{- $_ := set $podAnn "prometheus.io/port" (toString .adminPort) -}}
{{- $_ := set $podAnn "prometheus.io/path" "/metrics" -}}
{{- end -}}
metadata:
  labels:
    {{- include "moemesh.selectorLabels" $sel | nindent 4 }}
    app.kubernetes.io/part-of: moemesh
    {{- with (merge (deepCopy ($cfg.podLabels | default dict)) (deepCopy ($v.podLabels | default dict)) (deepCopy ($v.commonLabels | default dict))) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $podAnn }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "moemesh.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountServiceAccountToken }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $cfg.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $cfg.terminationGracePeriodSeconds }}
  terminationGracePeriodSeconds: {{ . }}
  {{- end }}
  {{- if and $nvidia $v.nvidia.runtimeClassName }}
  runtimeClassName: {{ $v.nvidia.runtimeClassName }}
  {{- end }}
  {{- $nodeSelector := deepCopy ($cfg.nodeSelector | default dict) }}
  {{- if $nvidia }}{{ $nodeSelector = merge $nodeSelector (deepCopy ($v.nvidia.nodeSelector | default dict)) }}{{ end }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := $cfg.tolerations | default list }}
  {{- if $nvidia }}{{ $tolerations = concat $tolerations ($v.nvidia.tolerations | default list) }}{{ end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $cfg.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $cfg.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml $cfg.topologySpreadConstraints | nindent 4 }}
  {{- else if $v.topologySpread.enabled }}
  topologySpreadConstraints:
    - maxSkew: {{ $v.topologySpread.maxSkew }}
      topologyKey: {{ $v.topologySpread.topologyKey }}
      whenUnsatisfiable: {{ $v.topologySpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "moemesh.selectorLabels" $sel | nindent 10 }}
  {{- end }}
  {{- with (and .model (include "moemesh.modelInitContainer" $root)) }}
  initContainers:
    {{- . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "moemesh.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - {{ .component }}
        {{- range .args }}
        - {{ . | quote }}
        {{- end }}
        - "--log-level={{ $cfg.logLevel | default $v.logLevel }}"
        - "--threads={{ $cfg.threads }}"
        - "--admin-port={{ .adminPort }}"
        - "--instance=$(POD_NAME)"
        {{- range $cfg.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: MOEMESH_CPU_LIMIT
          valueFrom:
            resourceFieldRef:
              resource: limits.cpu
              divisor: "1"
        {{- with $cfg.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- range .ports }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          protocol: TCP
        {{- end }}
        - name: metrics
          containerPort: {{ .adminPort }}
          protocol: TCP
      startupProbe:
        httpGet: {path: /healthz, port: metrics}
        {{- toYaml $probes.startup | nindent 8 }}
      livenessProbe:
        httpGet: {path: /healthz, port: metrics}
        {{- toYaml $probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet: {path: /readyz, port: metrics}
        {{- toYaml $probes.readiness | nindent 8 }}
      resources:
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        {{- if .model }}
        - name: model
          mountPath: {{ $v.model.mountPath }}
          readOnly: true
        {{- end }}
        - name: tmp
          mountPath: /tmp
        {{- if and .gpu (include "moemesh.shmEnabled" $root) }}
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
        {{- with .mounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    {{- if .model }}
    {{- include "moemesh.modelVolume" $root | nindent 4 }}
    {{- end }}
    - name: tmp
      emptyDir: {}
    {{- if and .gpu (include "moemesh.shmEnabled" $root) }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shm.sizeLimit }}
    {{- end }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
