"""Measuring whether edits worked: CounterFact/zsRE metrics, perplexity, the sequential evaluation run."""
