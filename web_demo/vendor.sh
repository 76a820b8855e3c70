#!/usr/bin/env bash
# Refresh web_demo/vendor/ from the npm registry at the versions pinned in
# package.json (exact versions). The page itself loads nothing from a CDN.
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp package.json "$work"/
(cd "$work" && npm install --no-audit --no-fund --ignore-scripts --no-package-lock --silent)
src="$work/node_modules/@msgpack/msgpack"
rm -rf vendor/msgpack
mkdir -p vendor/msgpack
cp -r "$src/dist.esm/." vendor/msgpack/
find vendor/msgpack \( -name "*.map" -o -name "*.d.ts" -o -name "*.tsbuildinfo" \) -delete
cp "$src/LICENSE" vendor/msgpack/LICENSE
node -e "console.log(require('$src/package.json').version)" > vendor/msgpack/VERSION
echo "vendored @msgpack/msgpack $(cat vendor/msgpack/VERSION)"
