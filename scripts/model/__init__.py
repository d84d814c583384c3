"""The model a run uses: its checks and rule fetch_model's command (`prepare`), making it
ready once on the login side (`fetch`: weights, vLLM's model-info cache, the marker) and
a node's copy with the preflight checks of a submission (`stage`).

May import formats/, placement/ and engine/ (the engines' settings and command line that
rule fetch_model checks). The engines' own settings are engine/settings.py's.
"""
