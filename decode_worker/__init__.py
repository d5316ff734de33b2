"""The decode worker: an OpenAI/vLLM-compatible HTTP endpoint that prefills through a
Prefiller (in-process engine or remote prefill worker) and decodes requests in batches."""
