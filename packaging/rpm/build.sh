#!/usr/bin/env bash
# Build and check the RPM packaging of amqp-consumer on a machine without
# Fedora's macro packages (Debian with the "rpm" and "rpmlint" packages).
#
#   PYTHON=.venv/bin/python packaging/rpm/build.sh        (make rpm does this)
#
# 1. rpmspec -P on the spec WITHOUT stubs: every macro left unexpanded must be
#    listed in packaging/rpm/known-macros.txt (Fedora macros), so typos and
#    macros from packages the spec forgot to BuildRequire are caught.
# 2. The sdist (python -m build --sdist) and the SRPM (rpmbuild -bs) into dist/.
# 3. A LAYOUT build of the binary RPM (rpmbuild -bb --nodeps) with
#    packaging/rpm/stub-macros standing in for Fedora's pyproject/systemd macro
#    packages, into dist/; then its file list is checked.
# 4. rpmlint on the spec, the SRPM and the RPM with packaging/rpm/rpmlintrc.
#    The build fails on rpmlint errors (exit status != 0), not on warnings:
#    several warnings are artefacts of building on Debian, and the ones that
#    matter are turned into reviewed filters in rpmlintrc instead.
#
# PYTHON (default .venv/bin/python) runs every Python step; the "build"
# module is installed into it when missing. Exit status 0 means all passed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

spec=packaging/rpm/amqp-consumer.spec
stubs=packaging/rpm/stub-macros
known=packaging/rpm/known-macros.txt
lintrc=packaging/rpm/rpmlintrc
dist=$root/dist

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'build.sh: FAILED: %s\n' "$*" >&2; exit 1; }

PYTHON=${PYTHON:-.venv/bin/python}
case $PYTHON in
    */*) [ -x "$PYTHON" ] || die "PYTHON=$PYTHON is not executable (run 'make venv' or set PYTHON)"
         # Absolute, but without resolving the symlink: a venv's python must stay in its venv.
         PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;
    *)   PYTHON=$(command -v "$PYTHON") || die "PYTHON: no $PYTHON on PATH" ;;
esac
for tool in rpmspec rpmbuild rpm rpmlint tar; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install rpm rpmlint)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/amqp-consumer-rpm.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$dist" "$work"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}
topdir=(--define "_topdir $work")

# --- 1 ------------------------------------------------------------------------
step "rpmspec -P without stub macros: looking for unexpanded macros"
# Spec keywords look like macros but are sections and file directives.
keywords='^(prep|build|install|check|clean|pre|post|preun|postun|pretrans|posttrans|files|changelog|description|package|generate_buildrequires|doc|license|dir|attr|defattr|config|ghost|exclude|verify|docdir|lang|caps|artifact|readme)$'
used=$(rpmspec -P "${topdir[@]}" "$spec" \
    | grep -v '^[[:space:]]*#' \
    | grep -oE '%\{?[?!]*[A-Za-z_][A-Za-z0-9_]*' \
    | sed -E 's/^%\{?[?!]*//' | grep -vE "$keywords" | sort -u || true)
allowed=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$known" | grep -v '^$' | sort -u)
unknown=$(comm -23 <(printf '%s\n' "$used" | grep -v '^$' || true) <(printf '%s\n' "$allowed"))
if [ -n "$unknown" ]; then
    printf '  unexpanded and not in %s:\n' "$known" >&2
    printf '    %%%s\n' $unknown >&2
    die "unknown macros in $spec (a typo, or add the Fedora macro to $known)"
fi
printf '  unexpanded, all known Fedora macros: %s\n' "$(printf '%s ' $used)"

version=$(rpmspec -q --srpm --qf '%{version}\n' "${topdir[@]}" "$spec")
name=$(rpmspec -q --srpm --qf '%{name}\n' "${topdir[@]}" "$spec")

# --- 2 ------------------------------------------------------------------------
step "sdist and SRPM"
if ! "$PYTHON" -c 'import build.__main__' 2>/dev/null; then
    echo "  installing the 'build' module into $PYTHON's environment"
    "$PYTHON" -m pip install -q --disable-pip-version-check build
fi
sdist=$dist/amqp_consumer-$version.tar.gz
rm -f "$sdist"
"$PYTHON" -m build --sdist --outdir "$dist" . >"$work/sdist.log" 2>&1 \
    || { cat "$work/sdist.log" >&2; die "python -m build --sdist"; }
[ -f "$sdist" ] || die "expected $sdist (Source0 of the spec); is the pyproject version $version?"
members=$(tar -tzf "$sdist")
for f in README.md man/amqp-consumer.1 man/amqp-consumer.toml.5 conf/amqp-consumer@.service \
         conf/amqp-consumer.sysusers conf/amqp-consumer.toml \
         twisted/plugins/amqp_consumer_plugin.py tests/test_manpages.py; do
    grep -qxF "amqp_consumer-$version/$f" <<<"$members" \
        || die "the sdist lacks $f, which the spec installs or tests (list it in MANIFEST.in)"
done
echo "  $sdist"
cp "$sdist" conf/amqp-consumer.sysusers "$work/SOURCES/"
rm -f "$dist/$name-$version"-*.src.rpm
rpmbuild -bs "${topdir[@]}" "$spec" >"$work/srpm.log" 2>&1 \
    || { cat "$work/srpm.log" >&2; die "rpmbuild -bs"; }
srpm=$(ls "$work"/SRPMS/*.src.rpm)
cp "$srpm" "$dist/"
srpm=$dist/$(basename "$srpm")
echo "  $srpm"

# --- 3 ------------------------------------------------------------------------
step "rpmbuild -bb: layout build with stub macros standing in for Fedora's pyproject/systemd macro packages"
echo "  (checks the file layout and %files; Fedora's dependency generators and scriptlets are not exercised)"
rm -f "$dist/$name-$version"-*.noarch.rpm
log=$dist/$name-$version-rpmbuild.log
rpmbuild -bb --nodeps --load "$stubs" "${topdir[@]}" --define "__stub_python $PYTHON" "$spec" \
    >"$log" 2>&1 || { tail -n 60 "$log" >&2; die "rpmbuild -bb (last lines above, full log in $log)"; }
grep -E '^(stub-macros|warning):|tests? collected' "$log" | sed 's/^/  /' || true
rpmfile=$(ls "$work"/RPMS/noarch/*.noarch.rpm)
cp "$rpmfile" "$dist/"
rpmfile=$dist/$(basename "$rpmfile")
echo "  $rpmfile"

step "file list of $(basename "$rpmfile")"
files=$(rpm -qlp "$rpmfile")
site='/usr/lib/python3\.[0-9]+/site-packages'
for pattern in \
    "$site/twisted/plugins/amqp_consumer_plugin\.py" \
    "$site/twisted/plugins/__pycache__/amqp_consumer_plugin\..*\.pyc" \
    "$site/amqp_consumer/__init__\.py" \
    "$site/amqp_consumer-$version\.dist-info/METADATA" \
    '/usr/lib/systemd/system/amqp-consumer@\.service' \
    '/usr/lib/sysusers\.d/amqp-consumer\.conf' \
    '/etc/amqp-consumer/amqp-consumer\.toml' \
    '/usr/share/man/man1/amqp-consumer\.1(\.gz)?' \
    '/usr/share/man/man5/amqp-consumer\.toml\.5(\.gz)?'; do
    match=$(grep -E "^$pattern\$" <<<"$files" | head -n 1) || die "the RPM lacks a file matching $pattern"
    echo "  ok $match"
done
if grep -E '/twisted/plugins/dropin\.cache$|^/var/lib/amqp-consumer' <<<"$files"; then
    die "the RPM must not contain the files above (python3-twisted owns dropin.cache; systemd creates the state directory)"
fi
conf=$(rpm -qlvp "$rpmfile" | grep -E ' /etc/amqp-consumer/amqp-consumer\.toml$')
[[ $conf == -rw-r-----*root*amqp-consumer* ]] || die "config file mode/owner: $conf"
confdir=$(rpm -qlvp "$rpmfile" | grep -E ' /etc/amqp-consumer$')
[[ $confdir == drwxr-x---*root*amqp-consumer* ]] || die "config dir mode/owner: $confdir"
rpm -qcp "$rpmfile" | grep -qx /etc/amqp-consumer/amqp-consumer.toml || die "the config file is not %config"
echo "  ok /etc/amqp-consumer (0750) and amqp-consumer.toml (0640, %config) are root:amqp-consumer"

# --- 4 ------------------------------------------------------------------------
step "rpmlint (fails on errors, not on warnings)"
status=0
rpmlint -r "$lintrc" "$spec" "$srpm" "$rpmfile" || status=$?
[ "$status" -eq 0 ] || die "rpmlint reported errors (exit status $status)"

step "done: $(basename "$srpm") $(basename "$rpmfile") in dist/"
