"""The run's folder on any filesystem TensorFlow has: a local path, or a URL
(``gs://bucket/run``, ``s3://...``, ``hdfs://...``, ``ram://...``).

Every read, write, listing, rename and move of ``--model_dir`` goes through
here. A local path uses ``os`` and ``shutil`` (a rename is atomic there, and
a full disk or a refused write keeps its ``errno``); a URL uses
``tf.io.gfile``, TensorFlow's own filesystems, which its checkpoints,
summaries and SavedModels already write through.

Object stores have no rename: ``tf.io.gfile.rename`` copies the object and
deletes the original (TensorFlow's GCS filesystem does so on the server).
An atomic replacement (:func:`write_text_atomically`) is then "write a
``.tmp`` object, copy it over the target, delete the ``.tmp``": a reader sees
the old object or the new one, never half of one (an object is whole once
written), and a crash can leave the ``.tmp`` beside it, which the next write
replaces. A folder is moved file by file (:func:`move`): a crash in the
middle leaves the files split between the two places, none lost.
"""

from __future__ import annotations

import glob as _glob
import os
import shutil

from tftrain.errors import ConfigError, first_line

# What to do for a scheme TensorFlow 2.21 does not have built in.
# tensorflow-io's S3 and Azure filesystems (0.37.1, its latest release) are
# built for TensorFlow 2.16 and do not load into 2.21 (BUILD_NOTES.md).
_MOUNT = "mount the bucket as a folder (s3fs, gcsfuse, blobfuse) and give its path"
_SCHEME_HINTS = {
    "s3": f"tensorflow-io's S3 filesystem does not load into TensorFlow 2.21: {_MOUNT}",
    "az": f"tensorflow-io's Azure filesystem does not load into TensorFlow 2.21: {_MOUNT}",
    "hdfs": "TensorFlow reads HDFS through libhdfs: set HADOOP_HDFS_HOME and CLASSPATH",
    "http": "http(s) is not a filesystem: give a bucket (gs://) or a local path",
    "https": "http(s) is not a filesystem: give a bucket (gs://) or a local path",
}


def is_url(path: str) -> bool:
    """Whether ``path`` names a filesystem by its scheme (gs://, ram://)."""
    return "://" in path


def scheme(path: str) -> str:
    return path.split("://", 1)[0] if is_url(path) else ""


def join(*parts: str) -> str:
    return os.path.join(*parts)  # URLs join with '/' as POSIX paths do


def check_scheme(path: str, flag: str = "--model_dir") -> None:
    """Raises ConfigError, naming the scheme and what to do, when TensorFlow
    has no filesystem for ``path``'s URL scheme (no I/O: the scheme is
    looked up among those registered)."""
    if not is_url(path):
        return
    import tensorflow as tf

    name = scheme(path)
    if name in tf.io.gfile.get_registered_schemes():
        return
    hint = _SCHEME_HINTS.get(name, f"no installed package registers {name}://")
    raise ConfigError(
        f"{flag}={path}: TensorFlow has no filesystem for {name}:// here; {hint}. "
        "Built in: local paths, gs:// (Google Cloud Storage) and ram:// (one process "
        "only)."
    )


def check_reachable(path: str, flag: str = "--model_dir") -> None:
    """Raises ConfigError, with TensorFlow's reason, when the filesystem of
    URL ``path`` cannot be reached (no network, no credentials, no bucket)."""
    if not is_url(path):
        return
    import tensorflow as tf

    try:
        _gfile().exists(path)
    except tf.errors.OpError as e:
        first = first_line(e)[:300]
        raise ConfigError(f"{flag}={path} cannot be reached: {first}") from None


def check_shared(path: str, flag: str = "--model_dir") -> None:
    """Raises ConfigError for a folder a cluster's tasks cannot share."""
    if scheme(path) == "ram":
        raise ConfigError(
            f"{flag}={path}: ram:// lives in one process's memory, so a cluster's tasks "
            "cannot share it: give a local folder or a bucket (gs://...)."
        )


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """The names in folder ``path`` (without a trailing '/')."""
    if is_url(path):
        return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def glob(folder: str, pattern: str) -> list[str]:
    """The paths in ``folder`` whose names match ``pattern`` (``*``, ``?``)."""
    if is_url(folder):
        return _gfile().glob(join(folder, pattern))
    return _glob.glob(os.path.join(_glob.escape(folder), pattern))


def remove(path: str) -> None:
    if is_url(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    """Removes folder ``path`` and everything in it; a missing one is no error."""
    if is_url(path):
        import tensorflow as tf

        try:
            if _gfile().isdir(path):
                _gfile().rmtree(path)
        except tf.errors.NotFoundError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def mtime(path: str) -> float:
    """Seconds since the epoch of ``path``'s last change (0 where the
    filesystem keeps none: ram://). Raises OSError."""
    if not is_url(path):
        return os.path.getmtime(path)
    import tensorflow as tf

    try:
        return _gfile().stat(path).mtime_nsec / 1e9
    except tf.errors.OpError as e:
        raise FileNotFoundError(str(e)) from None


def read_text(path: str) -> str:
    """The text of file ``path``. Raises OSError when it cannot be read."""
    if not is_url(path):
        with open(path) as f:
            return f.read()
    import tensorflow as tf

    try:
        with _gfile().GFile(path, "r") as f:
            return f.read()
    except tf.errors.OpError as e:
        raise OSError(str(e)) from None


def write_text_atomically(path: str, text: str) -> None:
    """Replaces file ``path`` with ``text`` as a whole: a reader or a crash
    sees the old content or the new. On failure (a full disk), the old file
    stays and no ``.tmp`` is left beside it."""
    tmp = f"{path}.tmp"
    if not is_url(path):
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
        return
    import tensorflow as tf

    try:
        with _gfile().GFile(tmp, "w") as f:
            f.write(text)
        _gfile().rename(tmp, path, overwrite=True)
    except tf.errors.OpError as e:
        try:
            _gfile().remove(tmp)
        except tf.errors.OpError:
            pass
        raise OSError(f"{path}: {str(e).strip().splitlines()[0]}") from None


def replace(src: str, dst: str) -> None:
    """Renames file or folder ``src`` to ``dst``, replacing what is there
    (a file atomically on a local disk; a copy, then a delete, on an object
    store)."""
    if not is_url(src):
        if os.path.isdir(src):
            shutil.rmtree(dst, ignore_errors=True)
        os.replace(src, dst)
        return
    if _gfile().isdir(src):
        rmtree(dst)
        move(src, dst)
    else:
        _gfile().rename(src, dst, overwrite=True)


def move(src: str, dst: str) -> None:
    """Moves file or folder ``src`` to ``dst`` (which must not exist)."""
    if not is_url(src):
        shutil.move(src, dst)
        return
    gfile = _gfile()
    if not gfile.isdir(src):
        gfile.rename(src, dst, overwrite=False)
        return
    # Not every filesystem renames folders (ram:// does not; GCS does it
    # object by object anyway): move the files one by one.
    for folder, _, files in gfile.walk(src):
        relative = folder[len(src) :].lstrip("/")
        target = join(dst, relative) if relative else dst
        gfile.makedirs(target)
        for name in files:
            gfile.rename(join(folder, name), join(target, name), overwrite=False)
    gfile.rmtree(src)
