/*
 * udsbench: a closed-loop load generator for HTTP/1.1 keep-alive over a unix socket.
 *
 *   udsbench -u SOCKET [-c CONNS] [-d SECONDS] [-W WARMUP] [-p PATH] [-H 'Name: value']... [-j]
 *
 * Every connection keeps DEPTH requests in flight (-P, default 1: one request, wait for its
 * answer, send the next). Connections are spread over -t threads (default 1), each with its own
 * epoll loop. A request's latency runs from the moment its bytes are handed to the kernel to the
 * moment the last byte of its answer has been read. Only requests sent after the warm-up and
 * answered before the end are measured; every such latency is kept (nanoseconds) and sorted at the
 * end, so percentiles are exact (nearest rank), not bucketed.
 *
 * Answers are framed by Content-Length (or by the end of the connection when an answer has neither
 * Content-Length nor Transfer-Encoding). 1xx interim answers are skipped. Transfer-Encoding is
 * refused (counted in err_chunked, the connection is reopened). A malformed status line or header,
 * a head over 64 KiB or bytes nobody asked for count in err_parse. "Connection: close" (or an
 * HTTP/1.0 answer without keep-alive) is honoured: the connection is reopened, its requests still
 * unanswered count in err_io. Non-2xx final answers are measured and counted in non_2xx.
 *
 * Output: a summary, or with -j one JSON object (rps, p50_us ... max_us, errors, non_2xx, ...).
 * Exit status 0 when every answer was 2xx and nothing failed, 1 otherwise, 2 on bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define RBUF_SIZE (64 * 1024) /* also the largest answer head accepted */
#define TICK_MS 20            /* how often timeouts are checked */

enum { ST_HEAD, ST_BODY, ST_BODY_EOF };

struct worker;

struct conn {
  int fd;
  struct worker *w;
  /* answers */
  char *rbuf;
  size_t rpos, rlen;
  int state, close_after, status; /* of the answer being read */
  uint64_t body_left;
  /* requests in flight, oldest first: a ring of send times */
  uint64_t *sent;
  int ring_head, inflight;
  /* request bytes not yet taken by the kernel */
  char *obuf;
  size_t opos, olen;
  int watching_out;
};

struct worker {
  pthread_t thread;
  int epfd, nconns;
  struct conn *conns;
  uint64_t *lat;
  size_t nlat, cap;
  long long ok, non2xx, e_connect, e_io, e_parse, e_chunked, e_timeout, reconnects, body_bytes;
  long long status[600];
};

/* settings, fixed before the workers start */
static const char *sock_path;
static struct sockaddr_un addr;
static char *req;
static size_t reqlen;
static int depth = 1, head_request;
static uint64_t t_start, t_meas, t_end, timeout_ns;

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *xmalloc(size_t n) {
  void *p = calloc(1, n);
  if (!p) { perror("udsbench: calloc"); exit(2); }
  return p;
}

static void record(struct worker *w, uint64_t ns) {
  if (w->nlat == w->cap) {
    w->cap = w->cap ? w->cap * 2 : 1 << 16;
    w->lat = realloc(w->lat, w->cap * sizeof *w->lat);
    if (!w->lat) { perror("udsbench: realloc"); exit(2); }
  }
  w->lat[w->nlat++] = ns;
}

/* One connect, retried while the listener's backlog is full or the socket is not there yet. */
static int open_socket(uint64_t deadline) {
  for (;;) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0) return fd;
    int err = errno;
    close(fd);
    if ((err != EAGAIN && err != ECONNREFUSED && err != ENOENT) || now_ns() >= deadline) return -1;
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
  }
}

static void set_events(struct conn *c, int out) {
  struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
  epoll_ctl(c->w->epfd, EPOLL_CTL_MOD, c->fd, &ev);
  c->watching_out = out;
}

static void conn_close(struct conn *c) {
  if (c->fd >= 0) close(c->fd); /* close() also drops it from the epoll set */
  c->fd = -1;
  c->rpos = c->rlen = 0;
  c->state = ST_HEAD;
  c->close_after = 0;
  c->status = 0;
  c->body_left = 0;
  c->ring_head = c->inflight = 0;
  c->opos = c->olen = 0;
  c->watching_out = 0;
}

static int conn_open(struct conn *c, uint64_t deadline) {
  c->fd = open_socket(deadline);
  if (c->fd < 0) return -1;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  if (epoll_ctl(c->w->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) { close(c->fd); c->fd = -1; return -1; }
  return 0;
}

static int flush_out(struct conn *c) {
  while (c->opos < c->olen) {
    ssize_t n = send(c->fd, c->obuf + c->opos, c->olen - c->opos, MSG_NOSIGNAL);
    if (n > 0) { c->opos += (size_t)n; continue; }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!c->watching_out) set_events(c, 1);
      return 0;
    }
    return -1;
  }
  c->opos = c->olen = 0;
  if (c->watching_out) set_events(c, 0);
  return 0;
}

/* Top the connection up to DEPTH requests in flight (none once the run is over). */
static void fill(struct conn *c, uint64_t now) {
  if (c->fd < 0 || now >= t_end) return;
  int k = depth - c->inflight;
  if (k <= 0) return;
  if (c->opos > 0) {
    memmove(c->obuf, c->obuf + c->opos, c->olen - c->opos);
    c->olen -= c->opos;
    c->opos = 0;
  }
  for (int i = 0; i < k; i++) {
    memcpy(c->obuf + c->olen, req, reqlen);
    c->olen += reqlen;
    c->sent[(c->ring_head + c->inflight) % depth] = now;
    c->inflight++;
  }
  if (flush_out(c) < 0) { /* reopened at the next tick, not from here */
    c->w->e_io++;
    conn_close(c);
  }
}

/* Reopen a connection that failed or was closed; count a failure to do so. */
static void reopen(struct conn *c, uint64_t now) {
  conn_close(c);
  if (now >= t_end) return;
  uint64_t deadline = now + 1000000000u < t_end ? now + 1000000000u : t_end;
  if (conn_open(c, deadline) < 0) { c->w->e_connect++; return; }
  c->w->reconnects++;
  fill(c, now_ns());
}

static void fail(struct conn *c, long long *counter, uint64_t now) {
  (*counter)++;
  reopen(c, now);
}

/* The oldest request in flight is answered. */
static void answered(struct conn *c, int status, uint64_t now) {
  struct worker *w = c->w;
  uint64_t t0 = c->sent[c->ring_head];
  c->ring_head = (c->ring_head + 1) % depth;
  c->inflight--;
  if (t0 >= t_meas && now <= t_end) {
    record(w, now - t0);
    if (status >= 200 && status < 300) w->ok++; else w->non2xx++;
    w->status[status]++;
  }
}

static int is_digit(char ch) { return ch >= '0' && ch <= '9'; }

/* Does a comma-separated header value hold TOKEN (case-insensitive)? */
static int has_token(const char *v, size_t n, const char *token) {
  size_t tl = strlen(token);
  size_t i = 0;
  while (i < n) {
    while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
    size_t s = i;
    while (i < n && v[i] != ',') i++;
    size_t e = i;
    while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
    if (e - s == tl && strncasecmp(v + s, token, tl) == 0) return 1;
  }
  return 0;
}

/*
 * Parse one answer head, h[0..n) without the final CRLF CRLF. Returns 0 and fills the outputs,
 * or 1 (malformed) or 2 (Transfer-Encoding).
 */
static int parse_head(const char *h, size_t n, int *status, int *has_cl, uint64_t *cl, int *close_after) {
  /* status line: HTTP/1.x SP 3DIGIT [SP reason] */
  if (n < 12 || memcmp(h, "HTTP/1.", 7) != 0 || !is_digit(h[7]) || h[8] != ' ' || !is_digit(h[9]) ||
      !is_digit(h[10]) || !is_digit(h[11]) || (n > 12 && h[12] != ' ' && h[12] != '\r'))
    return 1;
  int minor = h[7] - '0';
  *status = (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
  if (*status < 100) return 1;
  *has_cl = 0;
  *cl = 0;
  int keep_alive = 0, close_tok = 0;
  const char *end = h + n; /* h[n] starts the blank line's CRLF CRLF: the last line has no CRLF here */
  const char *p = memchr(h, '\n', n);
  if (p && p[-1] != '\r') return 1;
  for (const char *q = h + 12; q < (p ? p - 1 : end); q++)
    if ((unsigned char)*q < ' ' && *q != '\t') return 1; /* controls in the reason phrase */
  p = p ? p + 1 : end;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    const char *le = end; /* the end of this line's content */
    if (eol) {
      if (eol == p || eol[-1] != '\r') return 1; /* a bare LF */
      le = eol - 1;
    }
    if (le == p || *p == ' ' || *p == '\t') return 1; /* an empty line, or obsolete line folding */
    const char *colon = memchr(p, ':', (size_t)(le - p));
    if (!colon || colon == p) return 1;
    for (const char *q = p; q < colon; q++)
      if (*q <= ' ' || *q >= 127) return 1; /* no space before the colon, no controls in the name */
    const char *v = colon + 1;
    while (v < le && (*v == ' ' || *v == '\t')) v++;
    const char *ve = le;
    while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
    size_t nl = (size_t)(colon - p), vl = (size_t)(ve - v);
    if (nl == 14 && strncasecmp(p, "content-length", 14) == 0) {
      if (vl == 0 || vl > 18) return 1;
      uint64_t x = 0;
      for (size_t i = 0; i < vl; i++) {
        if (!is_digit(v[i])) return 1;
        x = x * 10 + (uint64_t)(v[i] - '0');
      }
      if (*has_cl && x != *cl) return 1; /* two different lengths */
      *has_cl = 1;
      *cl = x;
    } else if (nl == 17 && strncasecmp(p, "transfer-encoding", 17) == 0) {
      return 2;
    } else if (nl == 10 && strncasecmp(p, "connection", 10) == 0) {
      if (has_token(v, vl, "close")) close_tok = 1;
      if (has_token(v, vl, "keep-alive")) keep_alive = 1;
    }
    p = eol ? eol + 1 : end;
  }
  *close_after = close_tok || (minor == 0 && !keep_alive);
  return 0;
}

/* The answer being read is complete. Returns 0, or -1 when the connection was closed (and reopened). */
static int complete(struct conn *c, uint64_t now) {
  answered(c, c->status, now);
  c->state = ST_HEAD;
  if (!c->close_after) return 0;
  c->w->e_io += c->inflight; /* pipelined requests the server will never answer */
  reopen(c, now);
  return -1;
}

/* Parse what the buffer holds. Returns 0, or -1 when the connection was closed (and reopened). */
static int parse(struct conn *c, uint64_t now) {
  struct worker *w = c->w;
  for (;;) {
    size_t avail = c->rlen - c->rpos;
    if (c->state == ST_BODY_EOF) { /* the answer ends with the connection */
      c->rpos = c->rlen;
      if (now >= t_meas) w->body_bytes += (long long)avail;
      break;
    }
    if (c->state == ST_BODY) {
      size_t take = avail < c->body_left ? avail : (size_t)c->body_left;
      c->rpos += take;
      c->body_left -= take;
      if (now >= t_meas) w->body_bytes += (long long)take;
      if (c->body_left > 0) break;
      if (complete(c, now) < 0) return -1;
      continue;
    }
    /* ST_HEAD */
    if (avail == 0) break;
    const char *h = c->rbuf + c->rpos;
    const char *e = memmem(h, avail, "\r\n\r\n", 4);
    if (!e) {
      if (c->rpos == 0 && c->rlen == RBUF_SIZE) { fail(c, &w->e_parse, now); return -1; }
      break;
    }
    if (c->inflight == 0) { fail(c, &w->e_parse, now); return -1; } /* an answer nobody asked for */
    int has_cl;
    uint64_t cl;
    int rc = parse_head(h, (size_t)(e - h), &c->status, &has_cl, &cl, &c->close_after);
    if (rc == 1 || (rc == 0 && c->status == 101) || (rc == 0 && c->status >= 600)) {
      fail(c, &w->e_parse, now);
      return -1;
    }
    if (rc == 2) { fail(c, &w->e_chunked, now); return -1; }
    c->rpos += (size_t)(e - h) + 4;
    if (c->status < 200) continue; /* interim (100 Continue, 103 Early Hints): the final answer follows */
    if (c->status == 204 || c->status == 304 || head_request) {
      c->body_left = 0;
      c->state = ST_BODY;
    } else if (has_cl) {
      c->body_left = cl;
      c->state = ST_BODY;
    } else {
      c->state = ST_BODY_EOF;
      c->close_after = 1;
    }
  }
  if (c->rpos == c->rlen) {
    c->rpos = c->rlen = 0;
  } else if (c->rpos > 0 && c->rlen == RBUF_SIZE) {
    memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
    c->rlen -= c->rpos;
    c->rpos = 0;
  }
  return 0;
}

static void on_readable(struct conn *c) {
  struct worker *w = c->w;
  ssize_t n = read(c->fd, c->rbuf + c->rlen, RBUF_SIZE - c->rlen);
  uint64_t now = now_ns();
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
    fail(c, &w->e_io, now);
    return;
  }
  if (n == 0) { /* the server closed the connection */
    if (c->state == ST_BODY_EOF) {
      c->close_after = 1;
      complete(c, now); /* counts what was pipelined behind it and reopens */
    } else if (c->inflight > 0 || c->rlen > c->rpos) {
      fail(c, &w->e_io, now);
    } else {
      reopen(c, now);
    }
    return;
  }
  c->rlen += (size_t)n;
  if (parse(c, now) < 0) return;
  fill(c, now);
}

static void check_timeouts(struct worker *w, uint64_t now) {
  for (int i = 0; i < w->nconns; i++) {
    struct conn *c = &w->conns[i];
    if (c->fd < 0) {
      if (now < t_end) reopen(c, now); /* a reconnect that failed earlier: try again */
      continue;
    }
    if (c->inflight > 0 && now - c->sent[c->ring_head] > timeout_ns) fail(c, &w->e_timeout, now);
  }
}

static void *run_worker(void *arg) {
  struct worker *w = arg;
  struct epoll_event evs[256];
  uint64_t now = now_ns(), next_tick = now + TICK_MS * 1000000u;
  for (int i = 0; i < w->nconns; i++) fill(&w->conns[i], now);
  while ((now = now_ns()) < t_end) {
    uint64_t wake = next_tick < t_end ? next_tick : t_end;
    int ms = wake > now ? (int)((wake - now + 999999) / 1000000) : 0;
    int n = epoll_wait(w->epfd, evs, 256, ms);
    if (n < 0 && errno != EINTR) { perror("udsbench: epoll_wait"); exit(2); }
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (c->fd < 0) continue;
      if (evs[i].events & EPOLLOUT) {
        if (flush_out(c) < 0) { fail(c, &w->e_io, now_ns()); continue; }
      }
      if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
    }
    now = now_ns();
    if (now >= next_tick) {
      check_timeouts(w, now);
      next_tick = now + TICK_MS * 1000000u;
    }
  }
  for (int i = 0; i < w->nconns; i++) conn_close(&w->conns[i]);
  return NULL;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* nearest rank: the smallest sample with at least p% of the samples at or below it, in µs */
static double pct(const uint64_t *v, size_t n, double p) {
  if (n == 0) return 0;
  double r = p / 100.0 * (double)n;
  size_t rank = (size_t)r;
  if ((double)rank < r) rank++;
  if (rank < 1) rank = 1;
  if (rank > n) rank = n;
  return (double)v[rank - 1] / 1000.0;
}

static void json_string(const char *s) {
  putchar('"');
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') printf("\\%c", ch);
    else if (ch < 0x20) printf("\\u%04x", ch);
    else putchar(ch);
  }
  putchar('"');
}

static void usage(void) {
  fprintf(stderr,
          "usage: udsbench -u SOCKET [options]\n"
          "  -u, --unix SOCKET     the server's unix socket (required)\n"
          "  -c, --conns N         connections (default 1)\n"
          "  -t, --threads N       threads, each with its own epoll loop (default 1)\n"
          "  -P, --pipeline N      requests in flight per connection (default 1: closed loop)\n"
          "  -d, --duration SEC    measured seconds (default 10)\n"
          "  -W, --warmup SEC      seconds before the measurement, not counted (default 0)\n"
          "  -m, --method M        request method (default GET)\n"
          "  -p, --path P          request target (default /)\n"
          "  -H, --header 'N: v'   an extra request header (repeatable)\n"
          "  -T, --timeout SEC     a request unanswered this long is an error (default 10)\n"
          "  -j, --json            print one JSON object instead of the summary\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *method = "GET", *path = "/";
  int nconns = 1, nthreads = 1, json = 0, opt;
  double duration = 10, warmup = 0, timeout = 10;
  size_t hcap = 4096, hlen = 0;
  char *headers = xmalloc(hcap);
  static const struct option longs[] = {
      {"unix", required_argument, 0, 'u'},     {"conns", required_argument, 0, 'c'},
      {"threads", required_argument, 0, 't'},  {"pipeline", required_argument, 0, 'P'},
      {"duration", required_argument, 0, 'd'}, {"warmup", required_argument, 0, 'W'},
      {"method", required_argument, 0, 'm'},   {"path", required_argument, 0, 'p'},
      {"header", required_argument, 0, 'H'},   {"timeout", required_argument, 0, 'T'},
      {"json", no_argument, 0, 'j'},           {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  while ((opt = getopt_long(argc, argv, "u:c:t:P:d:W:m:p:H:T:jh", longs, NULL)) != -1) {
    switch (opt) {
    case 'u': sock_path = optarg; break;
    case 'c': nconns = atoi(optarg); break;
    case 't': nthreads = atoi(optarg); break;
    case 'P': depth = atoi(optarg); break;
    case 'd': duration = atof(optarg); break;
    case 'W': warmup = atof(optarg); break;
    case 'm': method = optarg; break;
    case 'p': path = optarg; break;
    case 'H': {
      size_t l = strlen(optarg);
      if (strpbrk(optarg, "\r\n") || !strchr(optarg, ':')) {
        fprintf(stderr, "udsbench: -H wants 'Name: value' on one line\n");
        return 2;
      }
      while (hlen + l + 3 > hcap) {
        hcap *= 2;
        headers = realloc(headers, hcap);
        if (!headers) { perror("udsbench: realloc"); return 2; }
      }
      memcpy(headers + hlen, optarg, l);
      memcpy(headers + hlen + l, "\r\n", 3);
      hlen += l + 2;
      break;
    }
    case 'T': timeout = atof(optarg); break;
    case 'j': json = 1; break;
    default: usage();
    }
  }
  if (optind != argc || !sock_path || nconns < 1 || nthreads < 1 || depth < 1 || duration <= 0 ||
      warmup < 0 || timeout <= 0)
    usage();
  if (nthreads > nconns) nthreads = nconns;
  if (strlen(sock_path) >= sizeof addr.sun_path) {
    fprintf(stderr, "udsbench: socket path too long\n");
    return 2;
  }
  addr.sun_family = AF_UNIX;
  strcpy(addr.sun_path, sock_path);
  head_request = strcmp(method, "HEAD") == 0;
  signal(SIGPIPE, SIG_IGN);

  /* the request: two lines, as a minimal client sends, plus the -H headers */
  size_t rcap = strlen(method) + strlen(path) + hlen + 64;
  req = xmalloc(rcap);
  reqlen = (size_t)snprintf(req, rcap, "%s %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n", method, path, headers);

  /* connections, spread over the workers and opened before the clock starts */
  struct worker *ws = xmalloc(sizeof *ws * (size_t)nthreads);
  uint64_t deadline = now_ns() + (uint64_t)(timeout * 1e9);
  int connected = 0;
  for (int t = 0; t < nthreads; t++) {
    struct worker *w = &ws[t];
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0) { perror("udsbench: epoll_create1"); return 2; }
    w->nconns = nconns / nthreads + (t < nconns % nthreads);
    w->conns = xmalloc(sizeof *w->conns * (size_t)w->nconns);
    for (int i = 0; i < w->nconns; i++) {
      struct conn *c = &w->conns[i];
      c->w = w;
      c->fd = -1;
      c->rbuf = xmalloc(RBUF_SIZE);
      c->sent = xmalloc(sizeof *c->sent * (size_t)depth);
      c->obuf = xmalloc(reqlen * (size_t)depth);
      conn_close(c);
      if (conn_open(c, deadline) < 0) w->e_connect++;
      else connected++;
    }
  }
  if (connected == 0) {
    fprintf(stderr, "udsbench: could not connect to %s: %s\n", sock_path, strerror(errno));
    return 1;
  }

  timeout_ns = (uint64_t)(timeout * 1e9);
  t_start = now_ns();
  t_meas = t_start + (uint64_t)(warmup * 1e9);
  t_end = t_meas + (uint64_t)(duration * 1e9);
  for (int t = 1; t < nthreads; t++) {
    if (pthread_create(&ws[t].thread, NULL, run_worker, &ws[t]) != 0) {
      fprintf(stderr, "udsbench: pthread_create failed\n");
      return 2;
    }
  }
  run_worker(&ws[0]);
  for (int t = 1; t < nthreads; t++) pthread_join(ws[t].thread, NULL);

  /* merge */
  size_t n = 0;
  for (int t = 0; t < nthreads; t++) n += ws[t].nlat;
  uint64_t *lat = xmalloc(sizeof *lat * (n ? n : 1));
  struct worker tot = {0};
  size_t off = 0;
  for (int t = 0; t < nthreads; t++) {
    struct worker *w = &ws[t];
    if (w->nlat) memcpy(lat + off, w->lat, w->nlat * sizeof *lat);
    off += w->nlat;
    tot.ok += w->ok; tot.non2xx += w->non2xx; tot.e_connect += w->e_connect; tot.e_io += w->e_io;
    tot.e_parse += w->e_parse; tot.e_chunked += w->e_chunked; tot.e_timeout += w->e_timeout;
    tot.reconnects += w->reconnects; tot.body_bytes += w->body_bytes;
    for (int s = 0; s < 600; s++) tot.status[s] += w->status[s];
  }
  qsort(lat, n, sizeof *lat, cmp_u64);
  double sum = 0;
  for (size_t i = 0; i < n; i++) sum += (double)lat[i];
  double secs = duration, rps = (double)n / secs, mean = n ? sum / (double)n / 1000.0 : 0;
  double mn = n ? (double)lat[0] / 1000.0 : 0;
  long long errors = tot.e_connect + tot.e_io + tot.e_parse + tot.e_chunked + tot.e_timeout;

  if (json) {
    printf("{\"tool\":\"udsbench\",\"target\":");
    json_string(sock_path);
    printf(",\"path\":");
    json_string(path);
    printf(",\"conns\":%d,\"threads\":%d,\"pipeline\":%d,\"mode\":\"closed\",\"warmup_s\":%g,\"seconds\":%.3f,"
           "\"requests\":%zu,\"ok_2xx\":%lld,\"non_2xx\":%lld,\"errors\":%lld,\"err_connect\":%lld,"
           "\"err_io\":%lld,\"err_parse\":%lld,\"err_chunked\":%lld,\"err_timeout\":%lld,\"reconnects\":%lld,"
           "\"rps\":%.1f,\"min_us\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,"
           "\"max_us\":%.1f,\"mean_us\":%.1f,\"body_bytes\":%lld,\"status\":{",
           nconns, nthreads, depth, warmup, secs, n, tot.ok, tot.non2xx, errors, tot.e_connect, tot.e_io,
           tot.e_parse, tot.e_chunked, tot.e_timeout, tot.reconnects, rps, mn, pct(lat, n, 50), pct(lat, n, 90),
           pct(lat, n, 99), pct(lat, n, 99.9), pct(lat, n, 100), mean, tot.body_bytes);
    const char *sep = "";
    for (int s = 100; s < 600; s++)
      if (tot.status[s]) { printf("%s\"%d\":%lld", sep, s, tot.status[s]); sep = ","; }
    printf("}}\n");
  } else {
    printf("unix:%s  %s %s  conns %d  threads %d  pipeline %d  measured %.2fs  warmup %gs\n", sock_path, method,
           path, nconns, nthreads, depth, secs, warmup);
    printf("requests %zu  2xx %lld  non-2xx %lld  errors %lld (connect %lld io %lld parse %lld chunked %lld "
           "timeout %lld)  reconnects %lld\n",
           n, tot.ok, tot.non2xx, errors, tot.e_connect, tot.e_io, tot.e_parse, tot.e_chunked, tot.e_timeout,
           tot.reconnects);
    printf("throughput %.1f req/s  %.2f MB/s of bodies\n", rps, (double)tot.body_bytes / secs / 1e6);
    printf("latency µs  min %.1f  p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  mean %.1f\n", mn,
           pct(lat, n, 50), pct(lat, n, 90), pct(lat, n, 99), pct(lat, n, 99.9), pct(lat, n, 100), mean);
  }
  return errors || tot.non2xx ? 1 : 0;
}
