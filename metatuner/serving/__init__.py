"""Serving: answering queries with a predictor, outside the evaluation harness.

``predict`` answers a JSONL file of queries, resumably; ``engine`` micro-batches concurrent requests into
one batched ``predict`` call; ``protocol`` and ``server`` put the engine behind an OpenAI-compatible HTTP
API. This package sits above ``evaluation`` and ``training`` and below the CLI: it calls predictors, never
trains, and nothing below it imports it.
"""
