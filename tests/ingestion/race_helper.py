"""A second process for the concurrent-ingest test: ``python race_helper.py hold|race FOLDER FLAG``.

``hold`` ingests FOLDER and, with every block written and before the seal, waits for the file FLAG (it
writes FLAG.ready when it gets there). ``race`` ingests the same folder with a 2 s lock wait timeout and
exits 3 if it is refused as existing or in progress. Both connect as ``neureg`` does, from the environment.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> int:
    mode, folder, flag = sys.argv[1:4]
    import datajoint as dj

    import neureg
    import neureg.ingestion.insert as insert
    from neureg.errors import ScanExistsError
    from neureg.ingestion import ingest_folder

    neureg.connect()
    if mode == "hold":
        real = insert.Ingestion

        class Held:
            def __getattr__(self, name):
                return getattr(real, name)

            def insert1(self, row, **kwargs):
                Path(flag + ".ready").write_text("blocks written, seal next")
                while not os.path.exists(flag):
                    time.sleep(0.05)
                return real().insert1(row, **kwargs)

        insert.Ingestion = Held()
    else:
        connection = dj.conn()
        if connection.adapter.backend == "mysql":
            connection.query("SET SESSION innodb_lock_wait_timeout = 2")
        else:
            connection.query("SET lock_timeout = '2s'")
    try:
        print(ingest_folder(folder))
    except ScanExistsError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
