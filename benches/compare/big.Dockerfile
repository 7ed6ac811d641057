# benches/compare.sh: the 20,000-file, 400 MB context (no-op, one-change, cold).
FROM busybox
COPY . /app
RUN wc -c /app/d00/s0/f00000.dat > /app-size
