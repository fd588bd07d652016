from bitmoji.client.cli import main

raise SystemExit(main())
