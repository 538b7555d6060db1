"""TensorFlow Datasets builder `pix2pix`: the paired datasets of Isola et al. (2017).

Configs (one per official tarball): facades, cityscapes, maps, edges2shoes,
edges2handbags, night2day. Each official image holds A and B side by side
(A|B); an example here is

  image_a:   uint8 [H, W, 3], the left half of the file
  image_b:   uint8 [H, W, 3], the right half (same size as image_a)
  file_name: the file's path inside its split folder, e.g. "12.jpg"

The halves are stored as PNG, so they are exactly the decoded halves of the
official JPEG (no second lossy encoding); a built dataset is larger than its
tarball.

Importing this module registers the builder. Build, with the arguments of
`tfds build` (see `main` for why not the `tfds` executable itself):

  python -m p2p_jax.datasets.pix2pix_tfds pix2pix/facades \
      [--data_dir=DIR] [--manual_dir=MANUAL_DIR]

or let `load_split` (or `tfds.load`) build it on first use:

  import p2p_jax.datasets.pix2pix_tfds
  ds = tfds.load('pix2pix/facades', split='train', data_dir=DIR, try_gcs=False)

Without network, fetch http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/NAME.tar.gz
on another machine and put it in the manual directory (`--manual_dir`, or
`tfds.download.DownloadConfig(manual_dir=...)`; default DATA_DIR/downloads/manual):
a tarball found there is used and nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import socket
import sys
import urllib.parse
from typing import TYPE_CHECKING, Iterator

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from p2p_jax.datasets.errors import DataError
from p2p_jax.datasets import folder

if TYPE_CHECKING:
  import tensorflow as tf   # TFDS imports TensorFlow itself, when it first needs it

_URL_TEMPLATE = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/{name}.tar.gz"
_HOMEPAGE = "https://phillipi.github.io/pix2pix/"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_PIX2PIX_BIBTEX = r"""@inproceedings{isola2017pix2pix,
  title={Image-to-Image Translation with Conditional Adversarial Networks},
  author={Isola, Phillip and Zhu, Jun-Yan and Zhou, Tinghui and Efros, Alexei A.},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2017}
}"""
_HED_BIBTEX = r"""@inproceedings{xie2015hed,
  title={Holistically-Nested Edge Detection},
  author={Xie, Saining and Tu, Zhuowen},
  booktitle={IEEE International Conference on Computer Vision (ICCV)},
  year={2015}
}"""
_SOURCE_BIBTEX = {
    "facades": r"""@inproceedings{tylecek2013facades,
  title={Spatial Pattern Templates for Recognition of Objects with Regular Structure},
  author={Tyle{\v{c}}ek, Radim and {\v{S}}{\'a}ra, Radim},
  booktitle={German Conference on Pattern Recognition (GCPR)},
  year={2013}
}""",
    "cityscapes": r"""@inproceedings{cordts2016cityscapes,
  title={The Cityscapes Dataset for Semantic Urban Scene Understanding},
  author={Cordts, Marius and Omran, Mohamed and Ramos, Sebastian and Rehfeld, Timo and
          Enzweiler, Markus and Benenson, Rodrigo and Franke, Uwe and Roth, Stefan and
          Schiele, Bernt},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2016}
}""",
    "edges2shoes": r"""@inproceedings{yu2014zappos,
  title={Fine-Grained Visual Comparisons with Local Learning},
  author={Yu, Aron and Grauman, Kristen},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2014}
}""" + "\n" + _HED_BIBTEX,
    "edges2handbags": r"""@inproceedings{zhu2016igan,
  title={Generative Visual Manipulation on the Natural Image Manifold},
  author={Zhu, Jun-Yan and Kr{\"a}henb{\"u}hl, Philipp and Shechtman, Eli and Efros, Alexei A.},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2016}
}""" + "\n" + _HED_BIBTEX,
    "night2day": r"""@article{laffont2014transient,
  title={Transient Attributes for High-Level Understanding and Editing of Outdoor Scenes},
  author={Laffont, Pierre-Yves and Ren, Zhile and Tao, Xiaofeng and Qian, Chao and Hays, James},
  journal={ACM Transactions on Graphics (SIGGRAPH)},
  volume={33}, number={4},
  year={2014}
}""",
}


@dataclasses.dataclass(eq=False)
class Pix2pixConfig(tfds.core.BuilderConfig):
  """One official tarball: its splits and what each half of an image shows."""
  splits: tuple[str, ...] = ()
  image_a: str = ""          # the left half of every file
  image_b: str = ""          # the right half
  paper_task: str = ""       # the translation the paper trains, with the direction it needs
  sizes: str = ""            # examples per split in the official tarball

  @property
  def url(self) -> str:
    return _URL_TEMPLATE.format(name=self.name)


def _config(name: str, splits: tuple[str, ...], image_a: str, image_b: str,
            paper_task: str, sizes: str) -> Pix2pixConfig:
  return Pix2pixConfig(
      name=name, splits=splits, image_a=image_a, image_b=image_b, paper_task=paper_task,
      sizes=sizes,
      description=(f"image_a (left half): {image_a}; image_b (right half): {image_b}. "
                   f"{paper_task}. Splits: {sizes}."))


_CONFIGS = (
    _config("facades", ("train", "val", "test"),
            "photo of a building facade (CMP Facades)",
            "its colour-coded architectural label map",
            "The paper translates labels -> photo: direction BtoA",
            "400 train / 100 val / 106 test, 256x256 halves"),
    _config("cityscapes", ("train", "val"),
            "street photo (Cityscapes)",
            "its colour-coded semantic label map",
            "The paper translates labels -> photo (BtoA) and photo -> labels (AtoB)",
            "2,975 train / 500 val, 256x256 halves"),
    _config("maps", ("train", "val"),
            "aerial photo (scraped from Google Maps)",
            "the map tile of the same place",
            "The paper translates aerial -> map (AtoB) and map -> aerial (BtoA)",
            "1,096 train / 1,098 val, 600x600 halves"),
    _config("edges2shoes", ("train", "val"),
            "HED edge map of a shoe (UT Zappos50K)",
            "the shoe photo",
            "The paper translates edges -> photo: direction AtoB",
            "~49.8k train / 200 val, 256x256 halves, 2.2 GB download"),
    _config("edges2handbags", ("train", "val"),
            "HED edge map of a handbag (Amazon handbags of iGAN)",
            "the handbag photo",
            "The paper translates edges -> photo: direction AtoB",
            "~138.6k train / 200 val, 256x256 halves"),
    _config("night2day", ("train", "val", "test"),
            "webcam scene at night (Transient Attributes)",
            "the same scene by day",
            "The paper translates day -> night: direction BtoA",
            "17,823 train / 10 val / 2,287 test, 256x256 halves"),
)
_CONFIGS_BY_NAME = {config.name: config for config in _CONFIGS}


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that never looks in the TFDS cloud bucket, which holds nothing for pix2pix."""

  def initialize_from_bucket(self) -> None:
    # TFDS calls this for every builder whose data is not prepared yet; where
    # GCS access is enabled it would query gs://tfds-data for every config.
    return


# Run as `python -m`, this file is also executed as `__main__`; only the copy
# imported under its package name registers the name "pix2pix".
class Pix2pix(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
  """The official pix2pix datasets, each A|B image split into image_a and image_b."""

  name = "pix2pix"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: the six official pix2pix tarballs."}
  BUILDER_CONFIGS = list(_CONFIGS)
  DEFAULT_BUILDER_CONFIG_NAME = "facades"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Optional. Without network access, download
  http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/NAME.tar.gz (NAME = the config,
  e.g. facades) elsewhere and place it as `manual_dir/NAME.tar.gz`. It is used from
  there and nothing is downloaded.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds this file through `importlib_resources`, which it
    # installs only on Python < 3.9, so every build fails without it
    # (tensorflow/datasets#11212). The path is known here.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return _LocalDatasetInfo(
        builder=self,
        description=(
            "Paired images of the pix2pix paper (Isola et al., CVPR 2017), from the "
            "official tarballs where A and B sit side by side in one JPEG. image_a is "
            "the left half, image_b the right half, both stored losslessly as PNG.\n\n"
            f"{config.name}: {config.description}"),
        features=tfds.features.FeaturesDict({
            "image_a": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "image_b": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }),
        homepage=_HOMEPAGE,
        citation="\n".join(filter(None, (_PIX2PIX_BIBTEX, _SOURCE_BIBTEX.get(config.name)))),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    tarball = _tarball(dl_manager, self.builder_config)
    return {split: self._generate_examples(dl_manager, tarball, split)
            for split in self.builder_config.splits}

  def _generate_examples(self, dl_manager: tfds.download.DownloadManager,
                         tarball: epath.Path, split: str
                         ) -> Iterator[tuple[str, dict[str, np.ndarray | str]]]:
    # Streaming the archive (one pass per split) needs no disk for an extracted
    # copy, which for edges2shoes and edges2handbags would be several more GB.
    prefix = f"{self.builder_config.name}/{split}/"
    num_examples = 0
    archive = tfds.download.Resource(path=tarball,
                                     extract_method=tfds.download.ExtractMethod.TAR_GZ)
    for member, file_obj in dl_manager.iter_archive(archive):
      member = member.replace("\\", "/")
      if not member.startswith(prefix) or not _is_image_name(member):
        continue
      where = f"{member} (in {tarball})"
      image_a, image_b = folder.split_pair(where, _decode(file_obj.read(), where))
      file_name = member[len(prefix):]
      num_examples += 1
      yield file_name, {"image_a": image_a, "image_b": image_b, "file_name": file_name}
    if not num_examples:
      raise DataError(str(tarball), f"holds no images under {prefix}; the official "
                      f"{self.builder_config.name}.tar.gz has {prefix}*.jpg. Replace it "
                      f"with the file from {self.builder_config.url}")


def _decode(data: bytes, where: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except Exception as error:   # PIL raises OSError, SyntaxError, ValueError, ... on bad data
    raise DataError(where, f"is not a readable image ({type(error).__name__}: {error}); "
                    "the tarball may be truncated: delete it and download it again") from None


def _is_image_name(member: str) -> bool:
  base = member.rsplit("/", 1)[-1]
  # "._x.jpg" are macOS resource forks that tar picks up; they are not images.
  return not base.startswith(".") and base.lower().endswith(_IMAGE_EXTENSIONS)


def _tarball(dl_manager: tfds.download.DownloadManager, config: Pix2pixConfig) -> epath.Path:
  """The manual-dir tarball if there is one, else the downloaded one."""
  # The public `dl_manager.manual_dir` raises when the folder is missing or
  # empty, which is the normal case here (the manual tarball is optional).
  manual_dir = epath.Path(dl_manager._manual_dir or dl_manager.download_dir / "manual")  # pylint: disable=protected-access
  manual_tarball = manual_dir / f"{config.name}.tar.gz"
  if manual_tarball.exists():
    return manual_tarball
  try:
    _check_reachable(config.url)
    return epath.Path(dl_manager.download(config.url))
  except Exception as error:   # no network, proxy, HTTP error, bad checksum, ...
    raise DataError(str(manual_tarball), (
        f"not found, and downloading {config.url} failed ({type(error).__name__}: "
        f"{error}). Fetch {config.url} on a machine with network access and put it at "
        f"{manual_tarball}, or in a folder you pass as --config.data.tfds_manual_dir=DIR; it "
        "is then used without downloading. To run the same code on synthetic stand-in data "
        "instead, add :smoke to the config (e.g. --config=configs/facades.py:smoke). (Outside "
        "a training: `tfds build --manual_dir=DIR`, or load_split(..., manual_dir=DIR).)"
    )) from error


def _check_reachable(url: str, timeout: float = 5.0) -> None:
  """Raises OSError in seconds when `url`'s server cannot be reached.

  Without it, TFDS's downloader retries for minutes before it gives up. Behind a
  proxy (HTTP(S)_PROXY set) only the proxy knows: nothing is checked then.
  """
  if any(os.environ.get(name) for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                                            "https_proxy", "ALL_PROXY", "all_proxy")):
    return
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  with socket.create_connection((parts.hostname, port), timeout=timeout):
    pass


def split_names(name: str) -> tuple[str, ...]:
  """The splits of the official `name` tarball, e.g. ('train', 'val') for maps."""
  return _config_named(name).splits


def load_split(name: str, split: str, data_dir: str | None, *,
               manual_dir: str | None = None) -> tf.data.Dataset:
  """The examples of pix2pix/`name`, building the dataset first if needed.

  Args:
    name: a config, e.g. "facades".
    split: "train", "val" or "test" (see `split_names`), optionally sliced as TFDS
      allows, e.g. "train[:10]".
    data_dir: TFDS data directory; None or "" for the TFDS default.
    manual_dir: where to look for `NAME.tar.gz` before downloading; None for
      DATA_DIR/downloads/manual.

  Returns:
    A dataset of {'image_a', 'image_b': uint8 [H, W, 3], 'file_name': string},
    in file order (not shuffled). Nothing is read from cloud storage.
  """
  config = _config_named(name)
  base_split = re.match(r"[\w-]*", split).group(0)
  if base_split not in config.splits:
    raise DataError(f"pix2pix/{name}", f"has no split {split!r}; its splits are "
                    f"{', '.join(config.splits)} (set --config.data.train_split / "
                    "--config.data.eval_split to one of them)")
  builder = Pix2pix(config=name, data_dir=data_dir or None)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir or None, try_download_gcs=False))
  return builder.as_dataset(split=split, shuffle_files=False)


def _config_named(name: str) -> Pix2pixConfig:
  config = _CONFIGS_BY_NAME.get(name)
  if config is None:
    raise DataError("pix2pix", f"has no dataset {name!r}; choose one of "
                    f"{', '.join(_CONFIGS_BY_NAME)} (--config.data.name)")
  return config


def main(argv: list[str] | None = None) -> None:
  """`tfds build` for this builder; takes the same arguments.

    python -m p2p_jax.datasets.pix2pix_tfds pix2pix/facades --data_dir=DIR [--manual_dir=DIR]

  The `tfds` executable of TFDS 4.9.10 imports Apache Beam when it starts, which
  this project does not install; its `build` command itself does not need Beam.
  Where Beam is installed, the same build is
  `tfds build pix2pix/facades --imports=p2p_jax.datasets.pix2pix_tfds ...`.
  """
  # Imported here: only this command needs TFDS's command-line modules.
  import simple_parsing   # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import build   # pylint: disable=g-import-not-at-top
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(arg.startswith(("--imports", "-i", "--module_import")) for arg in argv):
    argv.append("--imports=p2p_jax.datasets.pix2pix_tfds")   # registers "pix2pix"
  simple_parsing.parse(build.Args, args=argv).execute()


if __name__ == "__main__":
  main()
