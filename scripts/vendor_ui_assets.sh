#!/usr/bin/env bash
# Re-vendors the UI's Chart.js from the npm registry (the committed copy in src/ui/static/vendor/ came from
# this script): the tarball's sha512 integrity is checked against the registry's before anything is copied.
set -euo pipefail
VERSION=4.5.1
INTEGRITY="sha512-GIjfiT9dbmHRiYi6Nl2yFCq7kkwdkp1W/lp2J99rX0yo9tgJGn3lKQATztIjb5tVtevcBtIdICNWqlq5+E8/Pw=="
dest="$(cd "$(dirname "$0")/.." && pwd)/src/ui/static/vendor"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack "chart.js@$VERSION" --silent >/dev/null
got="sha512-$(openssl dgst -sha512 -binary "chart.js-$VERSION.tgz" | base64 -w0)"
[ "$got" = "$INTEGRITY" ] || { echo "chart.js-$VERSION.tgz: integrity $got, expected $INTEGRITY" >&2; exit 1; }
tar xzf "chart.js-$VERSION.tgz"
cp package/dist/chart.umd.min.js "$dest/chart.umd.min.js"
cp package/LICENSE.md "$dest/LICENSE-chart.js.md"
echo "vendored chart.js $VERSION into $dest"
