#!/usr/bin/env bash
# Seeds the fuzz corpus with every real message in ../tests/fixtures (one file per message).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/decode
for f in ../tests/fixtures/*.hex; do
  grep -v '^#' "$f" | awk '{print $3}' | head -400 | while read -r hex; do
    echo -n "$hex" | xxd -r -p > "corpus/decode/$(echo -n "$hex" | sha1sum | cut -c1-16)"
  done
done
ls corpus/decode | wc -l
