# aq — see README.md. `make run` and `make test` install what is missing first.

CARGO ?= cargo

.PHONY: setup build run test bench clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release -p aq-host

run: build
	@scripts/run.sh

test: setup
	scripts/test.sh

bench: build
	./target/release/aq bench policy

clean:
	$(CARGO) clean
