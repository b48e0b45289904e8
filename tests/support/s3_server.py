"""The tests' S3: moto's server in a thread (as `sessionmgr dev` runs it), with test credentials."""

from __future__ import annotations

import os

from sessionmgr.devstack import InProcessS3, dev_aws_credentials

S3_BUCKET = "sessionmgr-test"
S3Server = InProcessS3


def start_s3() -> InProcessS3:
    dev_aws_credentials(os.environ)  # moto takes any; none of them reach a real cloud
    return InProcessS3(S3_BUCKET).start()
