# aq — see README.md. `make run` and `make test` install what is missing first.

CARGO ?= cargo

.PHONY: setup build run test faults bench clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release -p aq-host

run: build
	@scripts/run.sh

test: setup
	scripts/test.sh

# The fault suite (also part of `make test`): etcd members and groups killed and paused under load.
faults: setup
	$(CARGO) build --locked -p aq-host --bin aq
	scripts/test.sh -p aq-tests --test faults

bench: build
	./target/release/aq bench policy

clean:
	$(CARGO) clean
