# shellcheck shell=sh
# (No "#!" line here: bridge.update_script() puts "#!/bin/sh" in front, so this template,
# shipped in the Python module, is not an executable script of the package.)
# update.sh of an OPQ bridge release, written by `opq-box-publish bridge`.
#
# The original box updater (box_updater.py, as root from cron) runs this after it
# verified the bridge package and unpacked it into its download directory. It moves
# the box to opq-box-updater and retires the original updater, in an order that never
# leaves the box without a working updater:
#
#   1. install opq-box-updater (from the operators' apt repository when one is
#      configured and reachable, else from the debs carried here), with the new
#      server_url preseeded through debconf: the package's postinst turns the original
#      /etc/opq/updater_config.json into the new config (and keeps a copy);
#   2. pin the trust anchor carried here when the installed package ships another one,
#      and set report_url when the bridge names one;
#   3. prove the new updater works: `opq-box-updater check` must verify the release
#      of the new server (exit 0 or 100); with report_url set, it reports the result;
#   4. only then remove the run_updater line from root's crontab and move
#      box_updater.py aside. The log file stays.
#
# When 1-3 fail, the box is put back (config restored, the carried packages this run
# installed removed again): the original updater stays in charge. local_version.json is
# removed on entry, so the original updater runs this again on its next run after a
# failure or a power cut; what a run installs and the original config are recorded
# before anything changes, so the run after a cut can still put the box back. Every step
# checks before it acts: running it again, at any point, is harmless. Output goes to the
# original updater's log.
set -u
umask 022
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DEBIAN_FRONTEND=noninteractive
export PATH DEBIAN_FRONTEND

HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || exit 1
# BRIDGE_VERSION, SERVER_URL, REPORT_URL (or empty), DEBS (file names in debs/),
# PACKAGES (their package names), UPDATER_DEB (the deb of opq-box-updater), APT_SOURCE,
# APT_KEYRING (file names in apt/, or empty), APT_KEYRING_PATH (Signed-By's keyring path).
# shellcheck source=/dev/null
. "$HERE/bridge.conf"

CONFIG=/etc/opq/updater_config.json
UPDATER=opq-box-updater
LEGACY_BIN=/usr/local/bin/box_updater.py
RETIRED_BIN=/usr/local/bin/box_updater.py.retired
SHIPPED_ANCHOR=/usr/share/opq-box-updater/root.json
PINNED_ANCHOR=/etc/opq/updater/trust-root.json
SAVED_CONFIG=$HERE/updater_config.json.before-bridge
INSTALLING=$HERE/bridge.installing

log() {
    printf '%s opq-bridge v%s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$BRIDGE_VERSION" "$*"
}

apt_get() {
    apt-get -q -y -o DPkg::Lock::Timeout=600 "$@"
}

# Whether package $1 is on the box (installed, or half-way: unpacked, half-configured...).
present() {
    case "$(dpkg-query -W -f '${db:Status-Status}' "$1" 2>/dev/null)" in
        "" | not-installed | config-files) return 1 ;;
        *) return 0 ;;
    esac
}

installed_version() {
    dpkg-query -W -f '${db:Status-Abbrev} ${Version}' "$UPDATER" 2>/dev/null |
        sed -n 's/^ii  *//p'
}

# True when $CONFIG is still the original updater's (the postinst's own rule).
config_is_legacy() {
    python3 - "$CONFIG" <<'EOF'
import json, sys
try:
    with open(sys.argv[1], encoding="utf-8") as handle:
        data = json.load(handle)
except (OSError, ValueError):
    sys.exit(1)
legacy = {"download_dir_path", "server_url", "version_file"}
sys.exit(0 if isinstance(data, dict) and set(data) <= legacy
         and "download_dir_path" in data else 1)
EOF
}

# Set key $1 of $CONFIG to the string $2: atomic, owner and mode kept, other keys kept.
set_config_key() {
    python3 - "$CONFIG" "$1" "$2" <<'EOF'
import json, os, sys, tempfile
path, key, value = sys.argv[1:]
path = os.path.realpath(path)
with open(path, encoding="utf-8") as handle:
    st = os.fstat(handle.fileno())
    data = json.load(handle)
if data.get(key) == value:
    sys.exit(0)
data[key] = value
fd, tmp = tempfile.mkstemp(prefix=".updater_config.", suffix=".tmp", dir=os.path.dirname(path))
with os.fdopen(fd, "w", encoding="utf-8") as out:
    json.dump(data, out, indent=2, ensure_ascii=False)
    out.write("\n")
    out.flush()
    os.fchown(out.fileno(), st.st_uid, st.st_gid)
    os.fchmod(out.fileno(), st.st_mode & 0o7777)
    os.fsync(out.fileno())
os.replace(tmp, path)
EOF
}

# Put the config file back as it was before this run (atomically). A symlinked config
# stays a link: the file it points to is put back, as the postinst rewrites that one.
restore_config() {
    [ -f "$SAVED_CONFIG" ] || return 0
    target=$(readlink -f -- "$CONFIG") || target=$CONFIG
    if ! cmp -s "$SAVED_CONFIG" "$target"; then
        cp -p "$SAVED_CONFIG" "$target.bridge-tmp" && sync "$target.bridge-tmp" &&
            mv -f "$target.bridge-tmp" "$target" && log "restored $CONFIG"
    fi
}

fail() {
    log "FAILED: $*"
    added=""
    for name in $PACKAGES; do
        case " $present_before " in
            *" $name "*) ;;
            *) if present "$name"; then added="$added $name"; fi ;;
        esac
    done
    if [ -z "$added" ]; then
        rm -f "$INSTALLING"
    else
        log "removing again what this run installed:$added"
        # shellcheck disable=SC2086 # package names, one word each
        if dpkg --remove --force-remove-reinstreq $added; then
            rm -f "$INSTALLING"
        else
            log "could not remove$added"
        fi
    fi
    restore_config
    log "the original updater stays in charge and runs this bridge again on its next run"
    exit 1
}

# The carried packages on the box but not fully installed (a cut, a failed dpkg run):
# dpkg --configure -a cannot finish a half-installed one, only a reinstall can.
broken_packages() {
    for name in $PACKAGES; do
        case "$(dpkg-query -W -f '${db:Status-Status}' "$name" 2>/dev/null)" in
            "" | not-installed | config-files | installed) ;;
            *) echo "$name" ;;
        esac
    done
}

# Whether opq-box-updater and every carried package apt installed are fully installed.
installed_ok() {
    [ -n "$(installed_version)" ] && [ -z "$(broken_packages)" ]
}

# Install opq-box-updater, preferring the operators' apt repository.
install_updater() {
    broken=$(broken_packages)
    reinstall=""
    if [ -n "$broken" ]; then
        reinstall=--reinstall
        log "not fully installed: $(echo "$broken" | tr '\n' ' ')(reinstalling)"
    fi
    if [ -n "$APT_SOURCE" ]; then
        install -d -m 0755 "$(dirname "$APT_KEYRING_PATH")" /etc/apt/sources.list.d
        install -m 0644 "$HERE/apt/$APT_KEYRING" "$APT_KEYRING_PATH"
        install -m 0644 "$HERE/apt/$APT_SOURCE" "/etc/apt/sources.list.d/$APT_SOURCE"
        # shellcheck disable=SC2086 # $reinstall and $broken: an option, package names
        if apt_get -o Dir::Etc::sourcelist="sources.list.d/$APT_SOURCE" \
                -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 update &&
            apt_get --no-install-recommends install $reinstall "$UPDATER" $broken &&
            installed_ok; then
            log "installed $UPDATER $(installed_version) from the apt repository"
            return 0
        fi
        log "the apt repository did not give $UPDATER; installing the carried debs"
    fi
    set --
    for deb in $DEBS; do
        set -- "$@" "$HERE/debs/$deb"
    done
    carried=$(dpkg-deb -f "$HERE/debs/$UPDATER_DEB" Version) || return 1
    current=$(installed_version)
    if [ -z "$reinstall" ] && [ -n "$current" ] &&
        dpkg --compare-versions "$current" ge "$carried"; then
        log "$UPDATER $current installed; the carried $carried is not newer"
        return 0
    fi
    # shellcheck disable=SC2086 # an option, or nothing
    apt_get --no-install-recommends install $reinstall "$@" && installed_ok || return 1
    log "installed $UPDATER $(installed_version) from the carried debs"
}

# Trust anchor: the package's own when it is the one carried here, else pinned in /etc.
pin_trust_anchor() {
    if [ -f "$SHIPPED_ANCHOR" ] && cmp -s "$SHIPPED_ANCHOR" "$HERE/trust-root.json"; then
        return 0
    fi
    install -d -m 0755 "$(dirname "$PINNED_ANCHOR")" || return 1
    if ! cmp -s "$PINNED_ANCHOR" "$HERE/trust-root.json"; then
        install -m 0644 "$HERE/trust-root.json" "$PINNED_ANCHOR.tmp" &&
            mv -f "$PINNED_ANCHOR.tmp" "$PINNED_ANCHOR" || return 1
        log "trust anchor pinned as $PINNED_ANCHOR"
    fi
    set_config_key trust_root "$PINNED_ANCHOR"
}

# Remove only the run_updater line from root's crontab; move box_updater.py aside.
retire_legacy() {
    if crontab -u root -l >"$HERE/crontab.root" 2>/dev/null &&
        grep -q '#[[:space:]]*run_updater[[:space:]]*$' "$HERE/crontab.root"; then
        grep -v '#[[:space:]]*run_updater[[:space:]]*$' "$HERE/crontab.root" \
            >"$HERE/crontab.new"
        crontab -u root "$HERE/crontab.new" || return 1
        log "removed the run_updater line from root's crontab (was kept in $HERE/crontab.root)"
    fi
    if [ -e "$LEGACY_BIN" ]; then
        mv -f "$LEGACY_BIN" "$RETIRED_BIN" && chmod a-x "$RETIRED_BIN" || return 1
        log "moved $LEGACY_BIN to $RETIRED_BIN"
    fi
}

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi
exec 9>"$HERE/.bridge.lock"
if ! flock -n 9; then
    log "another bridge run is active"
    exit 0
fi
# A failure or a power cut from here on: the original updater runs this again.
rm -f "$HERE/local_version.json"
# What was on the box before the bridge: present now and not installed by a bridge run
# that a power cut stopped (those are listed in $INSTALLING, written before installing).
present_before=""
for name in $PACKAGES; do
    if present "$name" && ! grep -qx "$name" "$INSTALLING" 2>/dev/null; then
        present_before="$present_before $name"
    fi
done
log "moving this box to $UPDATER, server $SERVER_URL"
for name in $PACKAGES; do
    case " $present_before " in
        *" $name "*) ;;
        *) echo "$name" ;;
    esac
done >"$INSTALLING.tmp"
{ sync "$INSTALLING.tmp" && mv -f "$INSTALLING.tmp" "$INSTALLING"; } ||
    fail "cannot write $INSTALLING"
# The config to put back on failure is the original updater's: a run stopped after the
# postinst migrated the config left that one here, and it is kept.
if [ ! -f "$CONFIG" ]; then
    rm -f "$SAVED_CONFIG"
elif config_is_legacy || [ ! -f "$SAVED_CONFIG" ]; then
    { cp -p "$CONFIG" "$SAVED_CONFIG.tmp" && sync "$SAVED_CONFIG.tmp" &&
        mv -f "$SAVED_CONFIG.tmp" "$SAVED_CONFIG"; } || fail "cannot copy $CONFIG"
fi
echo "$UPDATER $UPDATER/server_url string $SERVER_URL" | debconf-set-selections ||
    fail "cannot preseed the server URL"
if dpkg --audit 2>/dev/null | grep -q .; then
    log "dpkg was interrupted before: dpkg --configure -a"
    dpkg --configure -a || fail "dpkg --configure -a"
fi
install_updater || fail "installing $UPDATER"
if config_is_legacy; then
    dpkg-reconfigure -f noninteractive "$UPDATER" || fail "dpkg-reconfigure $UPDATER"
fi
if config_is_legacy; then
    fail "$CONFIG was not migrated"
fi
pin_trust_anchor || fail "pinning the trust anchor"
if [ -n "$REPORT_URL" ]; then
    set_config_key report_url "$REPORT_URL" || fail "setting report_url"
fi
opq-box-updater check
status=$?
case $status in
    0|100) log "opq-box-updater verified the release of $SERVER_URL (check: $status)" ;;
    *) fail "opq-box-updater check exited $status" ;;
esac
retire_legacy || {
    log "FAILED to retire the original updater; both run until the next attempt"
    exit 1
}
rm -f "$SAVED_CONFIG" "$INSTALLING"
log "done: $UPDATER $(installed_version) runs from /etc/cron.d; the original updater is retired"
exit 0
