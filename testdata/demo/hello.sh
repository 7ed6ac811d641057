#!/bin/sh
cat "$GREETING_FILE"
cat /usr/share/demo/credits
