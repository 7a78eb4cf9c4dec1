#!/bin/sh
# The platform baseline: a message of the day, and a marker package that
# records the baseline version in the package database (built on the machine
# with dpkg-deb, so no network is needed).
set -eu

install -m 0644 /tmp/motd /etc/motd
rm -f /tmp/motd
printf '%s\n' "$GREETING" > /etc/imgbuild-greeting

package=/tmp/imgbuild-baseline
mkdir -p "$package/DEBIAN" "$package/usr/share/doc/imgbuild-baseline"
cat > "$package/DEBIAN/control" <<CONTROL
Package: imgbuild-baseline
Version: ${BASELINE_VERSION}
Architecture: all
Maintainer: Platform team <platform@example.com>
Description: marks a machine as built from the platform baseline
CONTROL
echo "baseline ${BASELINE_VERSION}" > "$package/usr/share/doc/imgbuild-baseline/VERSION"
dpkg-deb --build "$package" /tmp/imgbuild-baseline.deb >/dev/null
dpkg -i /tmp/imgbuild-baseline.deb
rm -rf "$package" /tmp/imgbuild-baseline.deb
