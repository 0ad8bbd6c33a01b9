"""``python -m service.client``, the same as ``resnet-client``."""

from service.client.cli import main

raise SystemExit(main())
