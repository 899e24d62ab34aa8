/*
 * udsceiling: the machine's ceiling for an HTTP/1.1 server on a unix socket.
 *
 *   udsceiling [-u] SOCKET
 *
 * One thread, one epoll loop, keep-alive. Every request gets the same answer: 200, a 64-byte JSON
 * body. It reads just enough of a request to answer it: the head up to the blank line (at most
 * 8 KiB), a Content-Length body skipped, "Connection: close" honoured, pipelined requests answered
 * in order with one write per read. Anything a real server does per request (routing, a policy, a
 * lookup, encoding) comes on top of this, so a server's req/s divided by this one's, measured in
 * the same run, is a figure that survives a noisy machine.
 *
 * SIGTERM or SIGINT: remove the socket and exit 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define BODY "{\"server\":\"udsceiling\",\"value\":\"0123456789abcdef0123456789abcd\"}"
#define ANSWER "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n" BODY
_Static_assert(sizeof BODY - 1 == 64, "the body is 64 bytes");

#define HEAD_MAX 8192
#define BATCH 64 /* answers per write */

struct client {
  int fd;
  char in[HEAD_MAX];
  size_t len;
  unsigned long long skip; /* request body bytes still to skip */
  int closing;             /* the client asked for Connection: close */
  char *out;               /* answers the kernel has not taken yet */
  size_t out_len, out_cap;
};

static volatile sig_atomic_t stopping;
static const char answer[] = ANSWER;
#define ANSWER_LEN (sizeof answer - 1)
static char batch[BATCH * ANSWER_LEN];

static void on_signal(int sig) { (void)sig; stopping = 1; }

static int token_in(const char *v, size_t n, const char *token) {
  size_t tl = strlen(token);
  for (size_t i = 0; i + tl <= n; i++)
    if (strncasecmp(v + i, token, tl) == 0) return 1;
  return 0;
}

/* Content-Length and Connection: close from one head; -1 for a head it will not serve. */
static int read_head(const char *h, size_t n, unsigned long long *cl, int *close_it) {
  *cl = 0;
  const char *p = memchr(h, '\n', n), *end = h + n;
  while (p && ++p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    const char *le = eol ? eol : end;
    const char *colon = memchr(p, ':', (size_t)(le - p));
    if (colon) {
      size_t nl = (size_t)(colon - p);
      const char *v = colon + 1;
      while (v < le && (*v == ' ' || *v == '\t')) v++;
      if (nl == 14 && strncasecmp(p, "content-length", 14) == 0) {
        *cl = 0;
        for (; v < le && *v >= '0' && *v <= '9'; v++) *cl = *cl * 10 + (unsigned long long)(*v - '0');
      } else if (nl == 17 && strncasecmp(p, "transfer-encoding", 17) == 0) {
        return -1; /* chunked request bodies: not for a ceiling */
      } else if (nl == 10 && strncasecmp(p, "connection", 10) == 0 && token_in(v, (size_t)(le - v), "close")) {
        *close_it = 1;
      }
    }
    p = eol;
  }
  return 0;
}

static void drop(int ep, struct client *c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  free(c->out);
  free(c);
}

/* Write what is queued, then N more answers. Returns -1 when the connection is gone. */
static int send_answers(int ep, struct client *c, size_t n) {
  while (c->out_len == 0 && n > 0) {
    size_t k = n < BATCH ? n : BATCH;
    ssize_t w = send(c->fd, batch, k * ANSWER_LEN, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    size_t done = w > 0 ? (size_t)w : 0;
    n -= k;
    if (done < k * ANSWER_LEN) { /* queue the rest */
      size_t rest = k * ANSWER_LEN - done;
      if (rest > c->out_cap) {
        char *p = realloc(c->out, rest);
        if (!p) return -1;
        c->out = p;
        c->out_cap = rest;
      }
      memcpy(c->out, batch + done, rest);
      c->out_len = rest;
    }
  }
  for (; n > 0; n--) { /* behind a queue: append */
    if (c->out_len + ANSWER_LEN > c->out_cap) {
      size_t cap = (c->out_cap ? c->out_cap * 2 : 4096) + ANSWER_LEN;
      char *p = realloc(c->out, cap);
      if (!p) return -1;
      c->out = p;
      c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, answer, ANSWER_LEN);
    c->out_len += ANSWER_LEN;
  }
  if (c->out_len) { /* while answers wait, stop reading requests */
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
  }
  return 0;
}

static int flush_queue(int ep, struct client *c) {
  size_t off = 0;
  while (off < c->out_len) {
    ssize_t w = send(c->fd, c->out + off, c->out_len - off, MSG_NOSIGNAL);
    if (w > 0) { off += (size_t)w; continue; }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    return -1;
  }
  memmove(c->out, c->out + off, c->out_len - off);
  c->out_len -= off;
  if (c->out_len == 0) {
    if (c->closing) return -1;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
  }
  return 0;
}

/* Read once, answer every complete request. Returns -1 when the connection is to be dropped. */
static int on_readable(int ep, struct client *c) {
  ssize_t r = read(c->fd, c->in + c->len, sizeof c->in - c->len);
  if (r < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
  if (r == 0) return -1;
  size_t len = c->len + (size_t)r, pos = 0, n = 0;
  while (pos < len) {
    if (c->skip) {
      size_t k = len - pos < c->skip ? len - pos : (size_t)c->skip;
      pos += k;
      c->skip -= k;
      continue;
    }
    const char *e = memmem(c->in + pos, len - pos, "\r\n\r\n", 4);
    if (!e) break;
    if (read_head(c->in + pos, (size_t)(e - (c->in + pos)), &c->skip, &c->closing) < 0) return -1;
    pos = (size_t)(e - c->in) + 4;
    n++;
    if (c->closing) break; /* nothing after a Connection: close is answered */
  }
  if (pos < len && c->skip == 0 && !c->closing) {
    if (pos == 0 && len == sizeof c->in) return -1; /* a head over HEAD_MAX */
    memmove(c->in, c->in + pos, len - pos);
    c->len = len - pos;
  } else {
    c->len = 0;
  }
  if (send_answers(ep, c, n) < 0) return -1;
  if (c->closing && c->out_len == 0) return -1;
  return 0;
}

int main(int argc, char **argv) {
  const char *path = NULL;
  if (argc == 2 && argv[1][0] != '-') path = argv[1];
  else if (argc == 3 && strcmp(argv[1], "-u") == 0) path = argv[2];
  if (!path) {
    fprintf(stderr, "usage: udsceiling [-u] SOCKET\n");
    return 2;
  }
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof addr.sun_path) {
    fprintf(stderr, "udsceiling: socket path too long\n");
    return 2;
  }
  strcpy(addr.sun_path, path);
  for (size_t i = 0; i < BATCH; i++) memcpy(batch + i * ANSWER_LEN, answer, ANSWER_LEN);

  struct stat st;
  if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path); /* a stale socket, never another file */
  int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
    perror("udsceiling");
    return 1;
  }
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
  fprintf(stderr, "udsceiling serving %s\n", path);
  struct epoll_event evs[256];
  while (!stopping) {
    int n = epoll_wait(ep, evs, 256, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      perror("udsceiling: epoll_wait");
      break;
    }
    for (int i = 0; i < n; i++) {
      struct client *c = evs[i].data.ptr;
      if (!c) { /* the listener */
        int fd;
        while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
          c = calloc(1, sizeof *c);
          if (!c) { close(fd); continue; }
          c->fd = fd;
          struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
        continue;
      }
      int rc = 0;
      if (evs[i].events & EPOLLOUT) rc = flush_queue(ep, c);
      else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) rc = on_readable(ep, c);
      if (rc < 0) drop(ep, c);
    }
  }
  unlink(path);
  return 0;
}
