# benches/compare.sh: four independent stages of ~0.5 s of real work each (distinct, so no
# engine may merge them), and a final stage that copies from all four. Built with --no-cache.
FROM busybox AS a
RUN dd if=/dev/zero bs=1M count=200 2>/dev/null | md5sum > /out-a

FROM busybox AS b
RUN dd if=/dev/zero bs=1M count=201 2>/dev/null | md5sum > /out-b

FROM busybox AS c
RUN dd if=/dev/zero bs=1M count=202 2>/dev/null | md5sum > /out-c

FROM busybox AS d
RUN dd if=/dev/zero bs=1M count=203 2>/dev/null | md5sum > /out-d

FROM busybox
COPY --from=a /out-a /out/
COPY --from=b /out-b /out/
COPY --from=c /out-c /out/
COPY --from=d /out-d /out/
RUN cat /out/out-a /out/out-b /out/out-c /out/out-d
