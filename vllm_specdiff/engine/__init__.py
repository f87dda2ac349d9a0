"""Engine glue: the standalone speculative loop, vLLM offline measurement and the demo.

The outermost layer (with `cli.py` and `vllm_plugin/`): it imports drafters, models and
verification, never the reverse. Only vLLM-facing code imports vllm, lazily.
"""
