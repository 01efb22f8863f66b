"""RECIPE retrieval tier (Chen et al., EMNLP 2024): edits held as retrieved continuous prompts, the LLM frozen.

* ``encoder``: the frozen sentence encoder (all-MiniLM-L6-v2) and its pooled features
* ``modules``: MLP_K, MLP_Q, MLP_P and the Knowledge Sentinel (``RecipeModel``), checkpoint I/O
* ``injection``: ``[prompt; query]`` input embeddings for any HF causal LM (and vLLM's ``prompt_embeds``)
* ``index``: exact top-1 search with the sentinel threshold (pure torch)
* ``repository``: the same, stored durably in Redis and shared by routers (``KnowledgeRepository``)
* ``tier``: ``RetrievalTier``, the facade the router uses
* ``training`` / ``evaluation``: ``editq retrieval train`` and the held-out check

The math modules import no Ray, Redis or vLLM; only ``repository`` (and ``tier`` when given a Redis URL) needs
redis-py.
"""
