"""fastcert's Hydra config tree. A package, so that the console scripts (``fastcert-train`` ...)
find it as the module ``fastcert.conf`` wherever fastcert is installed."""
