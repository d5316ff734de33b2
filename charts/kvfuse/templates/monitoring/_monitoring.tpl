{{/* Shared pieces of the monitoring templates: scrape targets and PromQL label matchers. */}}

{{/* The components scraped, with their metrics port name and path:
     a list of dicts (component, port, path, enabled). */}}
{{- define "kvfuse.monitoring.targets" -}}
{{- $v := .Values -}}
{{- $controller := dig "controller" "enabled" true ($v | toYaml | fromYaml) -}}
{{- $redis := and $v.monitoring.podMonitors.redis (dig "redis" "enabled" true ($v | toYaml | fromYaml)) -}}
- {component: cache, port: metrics, path: /metrics, enabled: true}
- {component: prefill, port: metrics, path: /metrics, enabled: true}
- {component: decode, port: http, path: /metrics, enabled: true}
- {component: controller, port: metrics, path: /metrics, enabled: {{ $controller }}}
- {component: redis, port: metrics, path: /metrics, enabled: {{ $redis }}}
{{- end -}}

{{/* The job label a component's PodMonitor gives its series (its resource name). */}}
{{- define "kvfuse.monitoring.job" -}}
{{- include "kvfuse.componentName" . -}}
{{- end -}}

{{/* PromQL matchers of one component's series: call with (dict "root" $ "component" "cache"). */}}
{{- define "kvfuse.monitoring.sel" -}}
job="{{ include "kvfuse.monitoring.job" . }}",namespace="{{ .root.Release.Namespace }}"
{{- end -}}
