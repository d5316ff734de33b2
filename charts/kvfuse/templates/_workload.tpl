{{/* What the workload templates share: byte sizes, images, secrets, pod spec pieces. */}}

{{/* A byte size (1048576, "512Mi", "2G", "4GiB") → bytes, an integer; fails on anything else. */}}
{{- define "kvfuse.bytes" -}}
{{- $s := . -}}
{{- if kindIs "float64" $s }}{{ $s = int64 $s }}{{ end -}}
{{- $s = toString $s | trim -}}
{{- $digits := regexFind "^[0-9]+" $s -}}
{{- $unit := trimPrefix $digits $s | trimSuffix "B" | trim -}}
{{- $units := dict "none" 1 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- $mult := get $units (default "none" $unit) -}}
{{- if or (not $digits) (not $mult) -}}
{{- fail (printf "not a byte size: %q (e.g. 1073741824, 512Mi, 2Gi)" $s) -}}
{{- end -}}
{{- mul (atoi $digits) $mult -}}
{{- end -}}

{{/* Bytes → a Kubernetes quantity in MiB, rounded up. */}}
{{- define "kvfuse.mebibytes" -}}
{{- printf "%dMi" (div (add (atoi (toString .)) 1048575) 1048576) -}}
{{- end -}}

{{/* Bytes the cache server's memory tier and unfinished uploads may hold, plus the headroom. */}}
{{- define "kvfuse.cacheMemoryBytes" -}}
{{- $c := .Values.cacheServer -}}
{{- $memory := include "kvfuse.bytes" $c.tiers.memory.bytes | atoi -}}
{{- $upload := include "kvfuse.bytes" $c.maxUploadBytes | atoi -}}
{{- $headroom := include "kvfuse.bytes" $c.memoryHeadroom | atoi -}}
{{- add $memory (ternary $memory $upload (eq $upload 0)) $headroom -}}
{{- end -}}

{{/* The cache server's memory request and limit: derived from the tier budgets; a limit set
in values must hold them (else the pod would be OOM-killed by its own cache). */}}
{{- define "kvfuse.cacheMemory" -}}
{{- $need := include "kvfuse.cacheMemoryBytes" . | atoi -}}
{{- $limit := dig "limits" "memory" "" (.Values.cacheServer.resources | default dict) -}}
{{- if $limit -}}
{{- $limitBytes := include "kvfuse.bytes" $limit | atoi -}}
{{- if lt $limitBytes $need -}}
{{- fail (printf "cacheServer: the memory budget does not fit the memory limit: tiers.memory.bytes %v + upload budget (maxUploadBytes, 0 = the memory budget) + memoryHeadroom %v = %d bytes, but resources.limits.memory is %v (%d bytes); raise the limit or lower the budget" .Values.cacheServer.tiers.memory.bytes .Values.cacheServer.memoryHeadroom $need $limit $limitBytes) -}}
{{- end -}}
{{- $limit -}}
{{- else -}}
{{- include "kvfuse.mebibytes" $need -}}
{{- end -}}
{{- end -}}

{{/* Resources of a workload: call with (dict "values" <component values> "memory" <quantity or "">
"gpu" <gpu values or nil>); a memory quantity sets both request and limit. */}}
{{- define "kvfuse.resources" -}}
{{- $res := deepCopy (.values.resources | default dict) -}}
{{- $requests := $res.requests | default dict -}}
{{- $limits := $res.limits | default dict -}}
{{- if .memory -}}
{{- $_ := set $requests "memory" .memory -}}
{{- $_ := set $limits "memory" .memory -}}
{{- end -}}
{{- if and .gpu .gpu.enabled -}}
{{- $_ := set $limits .gpu.resourceName .gpu.count -}}
{{- end -}}
{{- $_ := set $res "requests" $requests -}}
{{- $_ := set $res "limits" $limits -}}
{{- toYaml $res -}}
{{- end -}}

{{/* The kvfuse image: call with (dict "root" $ "gpu" <bool>). */}}
{{- define "kvfuse.image" -}}
{{- $img := .root.Values.image -}}
{{- $tag := $img.tag | default .root.Chart.AppVersion -}}
{{- if .gpu }}{{ $tag = $img.gpuTag | default (printf "%s-cuda" .root.Chart.AppVersion) }}{{ end -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}

{{- define "kvfuse.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "kvfuse.fullname" .)) -}}
{{- end -}}

{{- define "kvfuse.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "kvfuse.fullname" .)) -}}
{{- end -}}

{{- define "kvfuse.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "kvfuse.fullname" .)) -}}
{{- end -}}

{{/* Whether the cache servers have a Redis tier, and whether it takes a password. */}}
{{- define "kvfuse.redisOn" -}}
{{- if and .Values.redis.enabled .Values.redis.external.url -}}
{{- fail "redis.external.url is set while redis.enabled is true: set redis.enabled=false to use the external Redis" -}}
{{- end -}}
{{- if or .Values.redis.enabled .Values.redis.external.url }}true{{ end -}}
{{- end -}}
{{- define "kvfuse.redisPasswordOn" -}}
{{- if or .Values.redis.enabled .Values.redis.auth.existingSecret }}true{{ end -}}
{{- end -}}

{{/* The cache servers' Redis URL; $(REDIS_PASSWORD) is expanded by the kubelet from the env. */}}
{{- define "kvfuse.redisUrl" -}}
{{- $url := .Values.redis.external.url -}}
{{- if .Values.redis.enabled -}}
{{- $url = printf "redis://%s:%d/0" (include "kvfuse.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) -}}
{{- end -}}
{{- if include "kvfuse.redisPasswordOn" . -}}
{{- $url = regexReplaceAll "^(rediss?://)" $url "${1}:$(REDIS_PASSWORD)@" -}}
{{- end -}}
{{- $url -}}
{{- end -}}

{{/* A Secret value kept across upgrades: the live one if any, else fresh random (base64). */}}
{{- define "kvfuse.keptRandom" -}}
{{- $live := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* A service's config file in its format ("yaml", "json" or "toml"): the chart's settings plus `config` from values
(a key the chart sets itself fails, naming the value to use instead); whole-number floats (how
Helm reads YAML numbers) become integers, so a file says 8, not 8.0. Call with
(dict "settings" <chart's> "extra" <values' config> "where" "cacheServer" "format" "yaml"). */}}
{{- define "kvfuse.configData" -}}
{{- $out := dict -}}
{{- $extra := .extra | default dict -}}
{{- range $key, $value := $extra -}}
{{- if hasKey $.settings $key -}}
{{- fail (printf "%s.config.%s is set by the chart from its own values (see values.yaml under %s)" $.where $key $.where) -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := merge (deepCopy $extra) .settings -}}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) -}}
{{- $_ := set $out $key (int64 $value) -}}
{{- else -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- if eq .format "json" }}{{ toPrettyJson $out }}{{ else if eq .format "toml" }}{{ toToml $out }}{{ else }}{{ toYaml $out }}{{ end -}}
{{- end -}}

{{/* Env every kvfuse container gets: call with (dict "root" $ "values" <component values>). */}}
{{- define "kvfuse.env" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: HOME
  value: /tmp
- name: KVFUSE_CACHE_DIR
  value: /var/cache/kvfuse
{{- if .root.Values.auth.enabled }}
- name: KVFUSE_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "kvfuse.authSecretName" .root }}
      key: {{ .root.Values.auth.secretKey }}
{{- end }}
{{- with .values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every kvfuse pod gets: call with (dict "root" $ "values" <component values>
"component" <name>); writable /tmp and cache dir on a read-only root, the config, TLS. */}}
{{- define "kvfuse.volumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
- name: config
  configMap:
    name: {{ include "kvfuse.componentName" (dict "root" .root "component" .component) }}-config
{{- if and .root.Values.tls.enabled (has .component (list "cache" "prefill" "controller")) }}
- name: tls
  secret:
    secretName: {{ include "kvfuse.tlsSecretName" .root }}
{{- end }}
{{- with .values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kvfuse.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/kvfuse
- name: config
  mountPath: /etc/kvfuse
  readOnly: true
{{- if and .root.Values.tls.enabled (has .component (list "cache" "prefill" "controller")) }}
- name: tls
  mountPath: /etc/kvfuse/tls
  readOnly: true
{{- end }}
{{- with .values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level spec every workload shares: call with (dict "root" $ "values" <component values>
"component" <name>); only the controller's pods get an API token. */}}
{{- define "kvfuse.podScheduling" -}}
{{- if ne .component "controller" }}
automountServiceAccountToken: false
{{- end }}
{{- with .root.Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod metadata labels and annotations: call with (dict "root" $ "values" <component values>
"component" <name> "config" <rendered config, for the checksum>). */}}
{{- define "kvfuse.podMetadata" -}}
labels:
  {{- include "kvfuse.labels" . | nindent 2 }}
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ .config | sha256sum }}
  {{- with .values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The disk tier's volume size: persistence.size, else the disk budget plus 10%; a size set
in values must hold the budget. */}}
{{- define "kvfuse.diskClaimSize" -}}
{{- $c := .Values.cacheServer -}}
{{- $budget := include "kvfuse.bytes" $c.tiers.disk.bytes | atoi -}}
{{- if $c.persistence.size -}}
{{- if lt (include "kvfuse.bytes" $c.persistence.size | atoi) $budget -}}
{{- fail (printf "cacheServer.persistence.size %v is smaller than the disk budget tiers.disk.bytes %v" $c.persistence.size $c.tiers.disk.bytes) -}}
{{- end -}}
{{- $c.persistence.size -}}
{{- else -}}
{{- include "kvfuse.mebibytes" (add $budget (div $budget 10)) -}}
{{- end -}}
{{- end -}}

{{/* The decode pods' `model` label: decodeWorker.modelLabel, else the served model name. */}}
{{- define "kvfuse.modelLabel" -}}
{{- $label := .Values.decodeWorker.modelLabel | default .Values.model.servedName -}}
{{- if and (not $label) .Values.model.path -}}
{{- $label = base .Values.model.path | trimSuffix ".gguf" -}}
{{- end -}}
{{- $label | default "SmolLM2-135M-Instruct" | trunc 63 | trimSuffix "-" | trimSuffix "." -}}
{{- end -}}

{{/* Every cache server's own address (its pod's DNS name under the headless Service), as a
JSON list: what the prefill workers and vLLM's prefix store shard keys over. */}}
{{- define "kvfuse.cacheAddrs" -}}
{{- $c := .Values.cacheServer -}}
{{- $cacheName := include "kvfuse.componentName" (dict "root" . "component" "cache") -}}
{{- $addrs := list -}}
{{- range $i := until (int $c.replicas) -}}
{{- $addrs = append $addrs (printf "%s-%d.%s-headless.%s.svc.cluster.local:%d" $cacheName $i $cacheName $.Release.Namespace (int $c.ports.grpc)) -}}
{{- end -}}
{{- toJson $addrs -}}
{{- end -}}
