"""Serving adapters over one base: ``loraops generate``'s switcher (serving.py) and ``loraops serve``.

``loraops serve``: server.py assembles it from the project; models.py resolves model ids against the
registry (aliases followed with a TTL); engine.py keeps the base and the loaded adapters (LRU) and
generates one request at a time; generation.py turns tokens into the (streamed) answer;
openai_schema.py and openai_api.py speak OpenAI's chat-completions API over FastAPI.
"""
