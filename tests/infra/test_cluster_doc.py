"""docs/cluster.md: every manifests/, images/ or .github/ path the cluster guide names exists."""
import re

from .paths import ROOT


def test_cluster_doc_points_at_real_files():
    doc = (ROOT / "docs" / "cluster.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:manifests|images|\.github)/[\w./-]*\w)", doc))
    assert {"manifests/overlays/gke", "images/Dockerfile.cuda"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
