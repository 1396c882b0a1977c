# Two commands matter to a newcomer: `make demo` and `make test`. Everything else they need
# (Debian packages, the virtualenv) is installed on the way.

SHELL := /bin/bash
PY := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
BASE_DEBS := python3 python3-venv python3-requests python3-cryptography python3-debian \
	python3-setuptools dpkg-dev
TEST_DEBS := $(BASE_DEBS) nginx-light curl fakeroot
DEB_BUILD_DEBS := debhelper dh-python python3-all po-debconf lintian
INSTALL_TEST_DEBS := mmdebstrap
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: all venv test lint demo bench clean

all: test

$(VENV)/.stamp: setup.py pyproject.toml requirements-dev.txt
	@scripts/need-apt $(BASE_DEBS)
	$(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

venv: $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff check opq_box_updater tests bench
	$(VENV)/bin/mypy

test: venv
	@scripts/need-apt $(TEST_DEBS)
	scripts/run-tests

demo: venv
	@scripts/need-apt $(BASE_DEBS)
	$(VPY) scripts/demo.py

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache .mypy_cache .ruff_cache
