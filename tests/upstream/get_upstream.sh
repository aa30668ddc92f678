#!/usr/bin/env bash
# Clone the official repositories the differential suite runs beside ours, each at its pinned commit:
#   bash tests/upstream/get_upstream.sh DIR
#   pip install -r tests/upstream/requirements.txt
#   SEGDA_UPSTREAM=DIR python -m pytest -q tests -m upstream
# An existing checkout is checked out at the pinned commit (fetched when missing), never modified otherwise.
# The same list is REPOS in tests/upstream/harness.py.
set -euo pipefail
DIR="${1:?usage: bash tests/upstream/get_upstream.sh DIR}"
mkdir -p "$DIR"
while read -r name repo commit; do
  dst="$DIR/$name"
  if [ ! -d "$dst/.git" ]; then
    git clone --quiet "https://github.com/$repo.git" "$dst"
  fi
  git -C "$dst" cat-file -e "$commit^{commit}" 2>/dev/null || git -C "$dst" fetch --quiet origin "$commit"
  git -C "$dst" -c advice.detachedHead=false checkout --quiet --detach "$commit"
  echo "$name  $repo  $(git -C "$dst" rev-parse HEAD)"
done <<'LIST'
AdaptSegNet wasidennis/AdaptSegNet fca9ff0f09dab45d44bf6d26091377ac66607028
ADVENT valeoai/ADVENT 3e58d45a32fb9763a9d1b459326e1dec7caafe78
MaxSquareLoss ZJULearning/MaxSquareLoss 2fbc18fc4ee0a618bfb6a9c0e1318261c80541db
Adversarial_DA_Exp yifan-bao/Adversarial_DA_Exp 09979742d83fe6fd5de9b9f3aa6aa5fe9a44ea54
MADAN pikachusocute/MADAN 7a2918da44f5203b72652bc4cba0e70057482114
MADA munanning/MADA 2356c245a374a5e862f1333be9e701815a40a646
MADAv2 munanning/MADAv2 1c4fb8120a916eda675aa39fd9164273206a0eec
D2ADA tsunghan-wu/D2ADA 332ad9fbc0d169a751f02ea44e62ae425351571b
SS-ADA ywher/SS-ADA 483e335f2d0c5dbd19dc60278a75f7cba01350b2
SS-ADA-train ywher/SS-ADA a02e3d8fe8d19f2c1196b594db34a635a93b194c
TUFL ywher/TUFL e84db359556334dd8c985c9e0ff46fc647c0ed7b
LIST
