# Front door: `make demo` trains the example classifier, `make demo-lm` the language model,
# `make test` runs every test suite.
# Both install missing build dependencies first (Debian/Ubuntu). `make difftest` runs the
# differential tester against PyTorch for longer than the test suite does (tests/difftest/).

BUILD ?= build
MESON_OPTS ?=
THREADS ?= 2

.PHONY: all deps configure build test difftest demo demo-lm bench bench-classify bench-lm \
	bench-dist clean

all: build

deps:
	@sh tools/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD) $(MESON_OPTS)

configure: deps $(BUILD)/build.ninja

build: configure
	ninja -C $(BUILD)

test: build
	@sh tools/run-tests.sh $(BUILD)

DIFFTEST_SEEDS ?= 1 2 3 4
DIFFTEST_COUNT ?= 2000

difftest: deps
	@sh tools/install-deps.sh python3 python3-torch
	@$(MAKE) --no-print-directory build
	/usr/bin/python3 tests/difftest/difftest.py --runner $(BUILD)/tests/difftest_run \
		$(foreach s,$(DIFFTEST_SEEDS),--seed $(s)) --count $(DIFFTEST_COUNT)

demo: build
	@sh tools/demo.sh $(BUILD)

demo-lm: build
	@sh tools/demo-lm.sh $(BUILD)

bench: deps
	@sh tools/install-deps.sh python3-torch libopenblas-dev
	@$(MAKE) --no-print-directory build
	@sh bench/run.sh $(BUILD)

bench-classify: deps
	@sh tools/install-deps.sh python3 python3-torch
	@$(MAKE) --no-print-directory build
	@sh bench/classify.sh $(BUILD)

bench-lm: deps
	@sh tools/install-deps.sh python3 python3-torch
	@$(MAKE) --no-print-directory build
	@sh bench/lm.sh $(BUILD)

bench-dist: deps
	@sh tools/install-deps.sh python3 python3-torch
	@$(MAKE) --no-print-directory build
	@sh bench/dist.sh $(BUILD)

clean:
	rm -rf $(BUILD)
