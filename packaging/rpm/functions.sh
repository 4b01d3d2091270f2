# shellcheck shell=sh
# packaging/rpm/functions.sh: what the nimbus-* RPM scriptlets share (POSIX sh).
#
# RPM stores each scriptlet as text and runs it on its own: nothing can be sourced at install time. So
# packaging/build-rpm.sh puts this file in place of the line `. "${NIMBUS_RPM_FUNCTIONS:?...}"` of every
# scriptlet in packaging/rpm/<package>/, and the spec files (packaging/rpm/<package>.spec) read those assembled
# copies. A source scriptlet run on its own stops at that line with its message. (To run a scriptlet from the
# source tree: NIMBUS_RPM_FUNCTIONS=packaging/rpm/functions.sh.)
#
# rpm runs scriptlets as root with / being the system it changes (`rpm --root` chroots first); $1 is the number
# of instances of the package left after the step: %pre/%post 1 = first install, 2 = upgrade; %preun/%postun
# 0 = erase, 1 = upgrade. NIMBUS_RPM_ROOT (rpm never sets it) prefixes every path instead, to run the scriptlets
# against a directory tree from outside it (tests/tests/rpm.rs; an image build that installed with
# --noscripts). Names are then resolved in that tree's /etc/passwd and /etc/group, never through the host's
# NSS, and systemctl only ever touches that tree's unit files (--root).
#
# Policy (the .deb's): install = system user and state directory, enable the unit, never start it; upgrade =
# nothing but daemon-reload (not restarted); erase = stop and disable, and keep the state, the user and a
# changed configuration (rpm keeps that as *.rpmsave). RPM has no purge: packaging/README.md says what stays.

NIMBUS_ROOT=${NIMBUS_RPM_ROOT:-}

# True when systemd is PID 1 of the system being changed: not in a chroot, an image build or $NIMBUS_ROOT.
systemd_live() {
    [ -z "$NIMBUS_ROOT" ] && [ -d /run/systemd/system ]
}

# unit_files VERB UNIT: `systemctl preset|disable` on the unit files alone (--no-reload). Needs no running
# systemd: without one (or with --root) systemctl edits the symlinks itself, so a unit installed into an image
# is enabled when the image boots. Skipped where there is no systemctl; a failure does not fail the step.
unit_files() {
    if command -v systemctl >/dev/null 2>&1; then
        systemctl ${NIMBUS_ROOT:+"--root=$NIMBUS_ROOT"} --no-reload "$1" "$2" || :
    fi
}

# id_in_root passwd|group NAME: NAME's numeric id (third field) in the root's /etc/FILE, or nothing. Plain sh:
# no awk (an alternatives link, perhaps not there in a fresh image root).
id_in_root() {
    [ -r "$NIMBUS_ROOT/etc/$1" ] || return 0
    while IFS=: read -r entry _ id _; do
        if [ "$entry" = "$2" ]; then
            echo "$id"
            return 0
        fi
    done <"$NIMBUS_ROOT/etc/$1"
}

# create_system_user NAME HOME DESCRIPTION (%pre): the system user and group NAME, no login shell, unless the
# user exists. systemd-sysusers gets the line of the package's /usr/lib/sysusers.d/NAME.conf on stdin (%pre
# runs before that file is installed; --replace gives the line that file's priority, so an administrator's
# /etc/sysusers.d/NAME.conf still wins); without it, groupadd/useradd (shadow-utils).
create_system_user() {
    if [ -n "$(id_in_root passwd "$1")" ]; then
        return 0
    fi
    if command -v systemd-sysusers >/dev/null 2>&1; then
        printf 'u %s - "%s" %s /usr/sbin/nologin\n' "$1" "$3" "$2" |
            systemd-sysusers ${NIMBUS_ROOT:+"--root=$NIMBUS_ROOT"} --replace="/usr/lib/sysusers.d/$1.conf" -
    elif command -v useradd >/dev/null 2>&1; then
        if [ -z "$(id_in_root group "$1")" ]; then
            groupadd ${NIMBUS_ROOT:+--root "$NIMBUS_ROOT"} --system "$1"
        fi
        useradd ${NIMBUS_ROOT:+--root "$NIMBUS_ROOT"} --system --gid "$1" --no-create-home --home-dir "$2" \
            --shell /usr/sbin/nologin --comment "$3" "$1"
    else
        echo "$1: cannot create the system user $1 in ${NIMBUS_ROOT:-/}: install systemd (systemd-sysusers)" \
            "or shadow-utils (useradd), then install this package again" >&2
        exit 1
    fi
}

# state_dir DIR OWNER (%post): DIR, mode 0700, owned by the user and group OWNER; what is in it is kept.
state_dir() {
    uid=$(id_in_root passwd "$2")
    gid=$(id_in_root group "$2")
    if [ -z "$uid" ] || [ -z "$gid" ]; then
        echo "$1: user or group $2 is missing in $NIMBUS_ROOT/etc: create it (see /usr/lib/sysusers.d)" \
            "and reinstall this package" >&2
        exit 1
    fi
    mkdir -p "$NIMBUS_ROOT$1"
    chown "$uid:$gid" "$NIMBUS_ROOT$1"
    chmod 0700 "$NIMBUS_ROOT$1"
}

# after_install "$1" UNIT (%post): daemon-reload; on the first install only, `systemctl preset` (the package's
# preset file says enable; a site's own preset file can say disable), no start. Returns 0 on a first install.
after_install() {
    if systemd_live; then
        systemctl daemon-reload || :
    fi
    if [ "${1:-}" = 1 ]; then
        unit_files preset "$2"
        return 0
    fi
    return 1
}

# before_erase "$1" UNIT (%preun): on erase only, stop (when systemd runs) and disable the unit. An upgrade
# leaves the running service alone, as the .deb does.
before_erase() {
    if [ "${1:-}" = 0 ]; then
        if systemd_live; then
            systemctl stop "$2" || :
        fi
        unit_files disable "$2"
    fi
}

# after_erase "$1" PACKAGE (%postun): daemon-reload; on erase, the directories rpm created but does not own
# (the spec files list files only), when they are empty. The state directory stays.
after_erase() {
    if systemd_live; then
        systemctl daemon-reload || :
    fi
    if [ "${1:-}" = 0 ]; then
        rmdir "$NIMBUS_ROOT/usr/share/doc/$2" "$NIMBUS_ROOT/etc/nimbus" 2>/dev/null || :
    fi
}
