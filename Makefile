# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo serve test install bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build first: a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Prepares the stdlib demo corpus, then pretrains configs/tiny.yaml as 2 pipeline
# stages x 2 expert shards on an embedded local Ray cluster; the run lands in runs/demo/.
# Then serves it with Ray Serve and answers one completion and one chat through the openai client.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/python jobs/prepare_data.py --config configs/tiny.yaml
	$(BIN)/python jobs/pretrain.py --config configs/tiny.yaml --set train.run_name=demo
	$(BIN)/python jobs/serve.py --checkpoint runs/demo --set serve.dtype=float32 --smoke-request

# Serves runs/demo on 127.0.0.1:8000 until Ctrl-C (OpenAI's API; see README "Serving over HTTP").
serve: $(STAMP)
	$(BIN)/python jobs/serve.py --checkpoint runs/demo --set serve.dtype=float32

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/model_step.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/checkpoint_stall.py
	$(BIN)/python bench/pretrain_overhead.py
	$(BIN)/python bench/recovery.py
	$(BIN)/python bench/grad_overlap.py
	$(BIN)/python bench/serve_engine.py
	$(BIN)/python bench/serve_spec.py
	$(BIN)/python bench/serve_experts.py
	$(BIN)/python bench/serve_stages.py
	$(BIN)/python bench/serve_http_hops.py
	$(BIN)/python bench/serve_http.py
	$(BIN)/python bench/router.py

clean:
	rm -rf $(VENV) runs data
