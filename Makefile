# Two commands matter to a newcomer: `make demo` and `make test`. Everything else they need
# (Debian packages, the virtualenv) is installed on the way.

SHELL := /bin/bash
PY := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
BASE_DEBS := python3 python3-venv python3-requests python3-cryptography python3-debian \
	python3-setuptools python3-wheel dpkg-dev
# systemd-tmpfiles (the tmpfiles.d test): from systemd where it is installed, else the
# standalone package (which conflicts with systemd, so it is never asked for beside it).
TMPFILES_DEB := $(if $(shell command -v systemd-tmpfiles 2>/dev/null),,systemd-standalone-tmpfiles)
# The report collector (issue 10): gunicorn behind nginx, its store on SQLite and on a real
# PostgreSQL (tests/pgfix.py runs a throw-away cluster).
# chromium, chromium-driver and python3-selenium: the fleet page's browser test.
TEST_DEBS := $(BASE_DEBS) nginx-light curl fakeroot logrotate util-linux mount faketime \
	$(TMPFILES_DEB) gunicorn postgresql python3-psycopg2 shellcheck chromium chromium-driver \
	python3-selenium
# build-essential and python3-setuptools: dpkg-checkbuilddeps wants them on a fresh machine
# (build-essential implicitly, python3-setuptools from Build-Depends).
DEB_BUILD_DEBS := build-essential debhelper dh-python python3-all python3-setuptools po-debconf lintian
# The signed apt repository (scripts/apt-repo): apt-ftparchive, and gpg with its agent.
APT_REPO_DEBS := apt-utils gpg gpg-agent
INSTALL_TEST_DEBS := mmdebstrap e2fsprogs $(APT_REPO_DEBS)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: all venv test lint demo bench clean newcomer

all: test

$(VENV)/.stamp: setup.py pyproject.toml requirements-dev.txt
	@scripts/need-apt $(BASE_DEBS)
	$(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

venv: $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy

# The suite includes the packaging tests (dpkg-buildpackage, lintian) and the clean-root
# install test (mmdebstrap), so it needs their tools too.
# PYTEST_ARGS narrows the run, e.g. make test PYTEST_ARGS="-m 'not slow'".
test: venv
	@scripts/need-apt $(TEST_DEBS) $(DEB_BUILD_DEBS) $(INSTALL_TEST_DEBS)
	scripts/run-tests $(PYTEST_ARGS)

# Mutation testing of the verification core (mutmut, [tool.mutmut] in pyproject.toml): fails on
# a surviving mutant not listed in tests/mutation-equivalents.txt. MUTATE_ARGS="--reuse".
.PHONY: mutate
mutate: venv
	$(VPY) scripts/mutate $(MUTATE_ARGS)

demo: venv
	@scripts/need-apt $(BASE_DEBS)
	$(VPY) scripts/demo.py

# The README's two commands on a fresh Debian 12 root holding only git, make, python3 and
# ca-certificates (mmdebstrap, chroot; needs root): make demo, then the fast part of make
# test, on a clone of the committed HEAD. NEWCOMER_ARGS="--keep" keeps the root.
newcomer:
	@scripts/need-apt $(INSTALL_TEST_DEBS) git
	scripts/newcomer $(NEWCOMER_ARGS)

# The DESIGN 7 budgets as ratios against baselines measured in the same run (a few minutes,
# about 4.2 GiB of scratch space in TMPDIR); docs/performance.md explains the figures.
# make bench [BENCH_ARGS="--workdir DIR" | BENCH_ARGS=--tiny]
bench: venv
	@scripts/need-apt $(TEST_DEBS)
	$(VPY) -m bench $(BENCH_ARGS)

# Report load on the collector (issue 10): 10 000 boxes with their own keys send signed
# reports through nginx to gunicorn, stored in SQLite and in PostgreSQL (bench/reports.py,
# docs/performance.md). BENCH_REPORTS_ARGS="--boxes 500 --backend sqlite".
.PHONY: bench-reports
bench-reports: venv
	@scripts/need-apt $(TEST_DEBS)
	$(VPY) -m bench.reports $(BENCH_REPORTS_ARGS)

# The fleet page at fleet scale: bytes and time to serve 10 000 boxes paged and in one table
# (the baseline, same run), on SQLite and PostgreSQL, and chromium loading each
# (bench/fleetpage.py, docs/performance.md). BENCH_PAGE_ARGS="--boxes 2000 --no-browser".
.PHONY: bench-page
bench-page: venv
	@scripts/need-apt $(TEST_DEBS)
	$(VPY) -m bench.fleetpage $(BENCH_PAGE_ARGS)

# Coverage-guided fuzzing (atheris) of the parsers that read hostile bytes: JSON, roots,
# releases, manifests, zips, .debs (fuzz/run.py). FUZZ_TIME seconds per target;
# FUZZ_ARGS="--runs 1000000 zip" picks inputs and targets. Scratch in $TMPDIR/opq-fuzz.
FUZZ_TIME ?= 60
.PHONY: fuzz
fuzz: venv
	$(VPY) -m fuzz.run --time $(FUZZ_TIME) $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# --- Debian packages (debian/, docs/operations.md) -------------------------------------------
# make deb [TRUST_ROOT=repo/root/1.root.json] [DIST=dist] [DEB_VERSION=1.0.0+site1]
# builds opq-box-updater, opq-box-publisher and python3-opq-box-updater (the module both
# depend on) from a copy of the tree in DEB_WORK, a
# temporary directory outside the work tree, removed afterwards, failed builds included
# (so a build never writes into the work tree except DIST) with Debian's python3 and a clean PATH, and moves the .debs,
# .changes and .buildinfo into DIST. TRUST_ROOT is the operators' root, pinned in the box
# package; DEB_VERSION adds a changelog entry with that version to the copy (tests, site
# rebuilds).
DIST ?= dist
TRUST_ROOT ?=
DEB_VERSION ?=
DEB_WORK ?= $(or $(TMPDIR),/tmp)/opq-box-updater-deb.$(shell id -u).$(shell echo $$PPID)
DEB_BUILD_ENV := env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
DEB_TRUST_ROOT = $(if $(strip $(TRUST_ROOT)),$(abspath $(TRUST_ROOT)))

.PHONY: install-test apt-repo

deb:
	@scripts/need-apt $(DEB_BUILD_DEBS)
	@if [ -n "$(DEB_TRUST_ROOT)" ] && [ ! -f "$(DEB_TRUST_ROOT)" ]; then \
		echo "TRUST_ROOT=$(TRUST_ROOT): no such file" >&2; exit 2; fi
	@set -e; work="$(abspath $(DEB_WORK))"; dist="$(abspath $(DIST))"; \
	rm -rf "$$work"; trap 'rm -rf "$$work"' EXIT; mkdir -p "$$work/src" "$$dist"; \
	tar -c -f - --exclude-vcs --exclude=./.venv --exclude=./build --exclude=./dist \
		--exclude=./demo --exclude=./.pybuild --exclude='*.egg-info' --exclude=__pycache__ \
		--exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache . \
		| tar -x -f - -C "$$work/src"; \
	if [ -n "$(DEB_VERSION)" ]; then \
		{ printf 'opq-box-updater (%s) bookworm; urgency=medium\n\n' "$(DEB_VERSION)"; \
		  printf '  * Rebuild as %s.\n\n' "$(DEB_VERSION)"; \
		  printf ' -- OPQ Box Team <opq@example.org>  %s\n\n' "$$(date -R)"; \
		  cat "$$work/src/debian/changelog"; } > "$$work/changelog.new"; \
		mv "$$work/changelog.new" "$$work/src/debian/changelog"; \
	fi; \
	cd "$$work/src"; \
	$(DEB_BUILD_ENV) OPQ_TRUST_ROOT="$(DEB_TRUST_ROOT)" dpkg-buildpackage -us -uc -b; \
	cd "$$work"; \
	rm -f "$$dist"/opq-box-updater_* "$$dist"/opq-box-publisher_* \
		"$$dist"/python3-opq-box-updater_*; \
	mv opq-box-updater_*.deb opq-box-publisher_*.deb python3-opq-box-updater_*.deb \
		opq-box-updater_*.changes opq-box-updater_*.buildinfo "$$dist"/; \
	rm -rf "$$work"; \
	ls -l "$$dist"/opq-box-updater_* "$$dist"/opq-box-publisher_* "$$dist"/python3-opq-box-updater_*

# Zero errors and warnings; every override in debian/*.lintian-overrides says why.
lintian:
	@scripts/need-apt lintian
	@ls $(DIST)/opq-box-updater_*.changes >/dev/null 2>&1 || $(MAKE) deb
	lintian --fail-on error,warning --display-info $(DIST)/opq-box-updater_*.changes

# Install, reconfigure, upgrade, update, rotate logs and purge in a clean Debian 12 root
# (mmdebstrap); needs root. tests/test_debian_install.py.
install-test: venv
	@scripts/need-apt $(DEB_BUILD_DEBS) $(INSTALL_TEST_DEBS)
	$(VENV)/bin/pytest -v -p no:cacheprovider tests/test_debian_install.py

# The operators' signed apt repository for provisioning boxes (scripts/apt-repo,
# docs/operations.md "Provisioning from the apt repository"):
# make apt-repo APT_DIR=/srv/opq-box-apt APT_KEY=<40-digit fingerprint>
#     [APT_DEBS="dist/*.deb"] [APT_ARCHES="amd64 arm64 armhf"] [APT_PASSPHRASE_FILE=FILE]
# with GNUPGHOME in the environment (the key's home, e.g. on the offline stick).
APT_DIR ?=
APT_KEY ?=
APT_DEBS ?= $(wildcard $(DIST)/opq-box-updater_*.deb $(DIST)/opq-box-publisher_*.deb \
	$(DIST)/python3-opq-box-updater_*.deb)
APT_ARCHES ?= amd64 arm64 armhf
APT_PASSPHRASE_FILE ?=
apt-repo:
	@scripts/need-apt $(APT_REPO_DEBS)
	@if [ -z "$(APT_DIR)" ] || [ -z "$(APT_KEY)" ]; then \
		echo "usage: make apt-repo APT_DIR=DIR APT_KEY=FINGERPRINT [APT_DEBS=...]" >&2; exit 2; fi
	scripts/apt-repo "$(APT_DIR)" --key "$(APT_KEY)" --arch "$(APT_ARCHES)" \
		$(if $(APT_PASSPHRASE_FILE),--passphrase-file "$(APT_PASSPHRASE_FILE)") $(APT_DEBS)
