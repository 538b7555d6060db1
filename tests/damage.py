"""Damage to a saved checkpoint, aimed at bytes a restore reads: bit rot, a cut-off file, a
lost file."""

import os

import tensorstore


def largest_value(workdir, step):
  """(file, offset, length) of the largest array chunk that step's index points to.

  Found through OCDBT's own index, not by a file's size: a data file also holds index nodes
  that a restore never reads (each process's, superseded by the merged index), so bytes
  picked by position in a file may be bytes nothing reads.
  """
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  store = tensorstore.KvStore.open(f"file://{state}/").result()
  values, nodes = [], [ref["root"]["location"]
                       for ref in tensorstore.ocdbt.dump(store).result()["versions"][-1:]]
  while nodes:
    for entry in tensorstore.ocdbt.dump(store, nodes.pop()).result()["entries"]:
      if "location" in entry:                    # an interior node's entry: a child node
        nodes.append(entry["location"])
      elif "indirect_value" in entry:            # value:<prefix>:<file>:<offset>:<length>
        _, prefix, name, offset, length = entry["indirect_value"].split(":")
        values.append((int(length), entry["key"], os.path.join(state, prefix, name),
                       int(offset)))
  length, _, path, offset = max(values)
  return path, offset, length


def flip(value):
  """16 bytes in the middle of the value XORed: the file still reads, the numbers differ."""
  path, offset, length = value
  data = bytearray(open(path, "rb").read())
  for i in range(offset + length // 2 - 8, offset + length // 2 + 8):
    data[i] ^= 0x5A
  open(path, "wb").write(bytes(data))


def truncate(value):
  """The value's file cut off in the middle of the value."""
  path, offset, length = value
  data = open(path, "rb").read()
  open(path, "wb").write(data[:offset + length // 2])


def delete(value):
  os.remove(value[0])
