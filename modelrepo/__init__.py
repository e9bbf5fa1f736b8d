"""The model repository: the contract between the build pipeline and the server.

It imports no ML library, so the server never pulls torch, peft or optimum in.
Layout (the contract in full: README, "The model repository")::

    REPO/index.json              the commit point: which version of every name is live (and which are staged)
    REPO/config.json             the same models in the format OpenVINO Model Server reads
    REPO/.lock                   the lock every writer of index.json holds
    REPO/NAME/VERSION/           an immutable version folder, with manifest.json
    REPO/NAME/.staging-*/        a version being written; never live, swept on the next publish

REPO is a folder or s3://bucket/prefix; `modelrepo.store` says what the commit point is on each.
"""

from modelrepo.errors import RepositoryError
from modelrepo.index import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Entry, Index, read_index
from modelrepo.manifest import MANIFEST, hash_files, read_manifest, verify_version
from modelrepo.names import check_name
from modelrepo.publish import commit_entry, promote, publish_version, remove_entry, rollback
from modelrepo.store import Snapshot, Store, is_object_store, open_store

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "MANIFEST",
    "Entry",
    "Index",
    "RepositoryError",
    "Snapshot",
    "Store",
    "check_name",
    "commit_entry",
    "hash_files",
    "is_object_store",
    "open_store",
    "promote",
    "publish_version",
    "read_index",
    "read_manifest",
    "remove_entry",
    "rollback",
    "verify_version",
]
