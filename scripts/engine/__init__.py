"""The engine service: the engines' settings (`settings`), one engine process and its
lifecycle (`lifecycle`, `watchdog`), the servers (`vllm_server`, `inprocess`,
`echo_server`), the HTTP client (`client`), the supervisor of a submission's or a local
run's engines (`supervisor`, `local`), the ranks' pool (`routing`) and the differences
between vLLM releases (`vllm_versions`).

May import formats/, console and placement/. Knows nothing of ranks (rank/), the model
rule (model/), PBS submissions (pbs/) or reporting: those import it.
"""
