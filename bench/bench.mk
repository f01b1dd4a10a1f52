# Benchmarks (bench/README.md). Included by the top Makefile. Run them on a quiet machine: figures taken
# while other jobs share the CPU mean nothing. Results (JSON + markdown) land in $(BENCH_OUT).
BENCH_OUT ?= artifacts/bench
BENCH_ARGS ?=
BENCH_PEERS_ARGS ?=
PEERS ?= $(HOME)/.cache/kvserve-peers

bench: dev-deps model bytecode  ## kvserve beside transformers, in-process: offline throughput, batch-1 decode, cold start, guided decoding, speculative decoding
	$(BIN)/python -m bench.offline_throughput --output $(BENCH_OUT)/offline.json $(BENCH_ARGS)
	$(BIN)/python -m bench.decode_speed --output $(BENCH_OUT)/decode.json
	$(BIN)/python -m bench.cold_start --output $(BENCH_OUT)/cold_start.json
	$(BIN)/python -m bench.guided_throughput --output $(BENCH_OUT)/guided.json
	$(BIN)/python -m bench.speculative --output $(BENCH_OUT)/speculative.json

bench-peers: dev-deps model bytecode  ## kvserve, vLLM CPU and llama.cpp servers in turn, same prompts and client
	@test -x $(PEERS)/vllm/bin/vllm -a -x $(PEERS)/llama.cpp/llama-server || \
		{ echo "peers missing under $(PEERS): run ../shared/peers/setup.sh first"; exit 1; }
	$(BIN)/python -m bench.peers --offline --vllm-bench --repeats 3 --output $(BENCH_OUT)/peers.json \
		--log-dir $(BENCH_OUT)/logs \
		$(if $(wildcard $(BENCH_OUT)/offline.json),--offline-baseline $(BENCH_OUT)/offline.json) $(BENCH_PEERS_ARGS)

PROFILE_ARGS ?=
profile: dev-deps model bytecode  ## where a decode step's time goes (batch 1 and 64) and the HTTP/SSE cost per token
	$(BIN)/python -m bench.profile --http --trace-dir $(BENCH_OUT)/traces --output $(BENCH_OUT)/profile.json $(PROFILE_ARGS)
