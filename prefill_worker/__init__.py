"""The kvfuse prefill worker: fetches chunk KV layer by layer, blends, streams fused layers."""
