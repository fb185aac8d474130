// sluice::channel has one consumer. Issue 12 point 5: a second thread receiving at the same time
// must be reported, not hang or duplicate items silently. With SLUICE_CHECKS (debug builds, and
// the asan-ubsan / tsan presets) the channel aborts with a message naming sluice::channel and the
// misuse. Each misuse runs in a forked child (a death test): the parent checks that the child died
// of SIGABRT and what it wrote to stderr.
#include <sluice/channel.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

struct child_result {
  bool exited = false;
  int exit_code = -1;
  bool signaled = false;
  int signal = 0;
  std::string err;  // what the child wrote to stderr
};

// Runs `body` in a forked child with stderr captured. The child exits 0 if body returns. The
// parent waits at most 60 s (then kills the child and reports it as not aborted).
template <class Body>
child_result run_in_child(Body body) {
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    // The child: no Catch2 reporting here (its SIGABRT handler would print a failure report).
    ::signal(SIGABRT, SIG_DFL);
    ::close(pipe_fds[0]);
    ::dup2(pipe_fds[1], STDERR_FILENO);
    ::close(STDOUT_FILENO);
    body();
    ::_exit(0);
  }
  REQUIRE(pid > 0);
  ::close(pipe_fds[1]);
  child_result r;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  char buf[512];
  for (;;) {
    pollfd pfd{pipe_fds[0], POLLIN, 0};
    if (::poll(&pfd, 1, 100) > 0) {
      const ssize_t n = ::read(pipe_fds[0], buf, sizeof buf);
      if (n <= 0) break;  // EOF: the child is gone (or closed stderr)
      r.err.append(buf, static_cast<std::size_t>(n));
    }
    if (std::chrono::steady_clock::now() > give_up) {
      ::kill(pid, SIGKILL);
      break;
    }
  }
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.exited = WIFEXITED(status);
  r.exit_code = r.exited ? WEXITSTATUS(status) : -1;
  r.signaled = WIFSIGNALED(status);
  r.signal = r.signaled ? WTERMSIG(status) : 0;
  return r;
}

bool is_sleeping(pid_t tid) {
  std::ifstream stat("/proc/self/task/" + std::to_string(tid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const auto paren = text.rfind(')');
  return paren != std::string::npos && paren + 2 < text.size() && text[paren + 2] == 'S';
}

// In the child: one thread parks in a blocking receive, then this thread receives too.
template <class SecondReceive>
void second_receiver_while_one_is_parked(SecondReceive second) {
  sluice::channel<int> ch(8);
  std::atomic<pid_t> tid{0};
  std::thread first([&] {
    tid = static_cast<pid_t>(::syscall(SYS_gettid));
    (void)ch.receive();
  });
  while (tid.load() == 0 || !is_sleeping(tid.load())) std::this_thread::yield();
  second(ch);
  // Not reached with SLUICE_CHECKS: the second receive aborts. Without checks, unblock and leave.
  ch.close();
  first.join();
}

void check_aborted_with_message(const child_result& r) {
  INFO("child stderr: " << r.err);
  CHECK(r.signaled);
  CHECK(r.signal == SIGABRT);
  CHECK(r.err.find("sluice::channel") != std::string::npos);
  CHECK(r.err.find("two threads are receiving") != std::string::npos);
  CHECK(r.err.find("one consumer") != std::string::npos);
}

}  // namespace

TEST_CASE("channel misuse: a second concurrent receiver is reported (SLUICE_CHECKS)") {
  if (!SLUICE_CHECKS) {
    WARN("SLUICE_CHECKS is off in this build (NDEBUG without a sanitizer): nothing to check");
    return;
  }
  SECTION("try_receive") {
    check_aborted_with_message(run_in_child([] {
      second_receiver_while_one_is_parked([](sluice::channel<int>& ch) { (void)ch.try_receive(); });
    }));
  }
  SECTION("try_receive_for with a status") {
    check_aborted_with_message(run_in_child([] {
      second_receiver_while_one_is_parked([](sluice::channel<int>& ch) {
        std::optional<int> out;
        (void)ch.try_receive_for(out, std::chrono::milliseconds(1));
      });
    }));
  }
  SECTION("receive_batch") {
    check_aborted_with_message(run_in_child([] {
      second_receiver_while_one_is_parked([](sluice::channel<int>& ch) {
        std::vector<int> out;
        (void)ch.try_receive_batch(out, 4);
      });
    }));
  }
  SECTION("iteration") {
    check_aborted_with_message(run_in_child([] {
      second_receiver_while_one_is_parked([](sluice::channel<int>& ch) {
        for (int v : ch) (void)v;
      });
    }));
  }
}

TEST_CASE("channel misuse: consumers taking turns (one after another) are fine") {
  // The rule is one receiver at a time, not one thread forever: a hand-over is allowed.
  const auto r = run_in_child([] {
    sluice::channel<int> ch(8);
    for (int i = 0; i < 4; ++i) (void)ch.send(i);
    std::thread([&] { (void)ch.receive(); }).join();
    std::thread([&] { (void)ch.receive(); }).join();
    std::optional<int> out;
    if (ch.try_receive(out) != sluice::channel_status::ok || ch.receive() != 3) ::_exit(3);
  });
  INFO("child stderr: " << r.err);
  CHECK(r.exited);
  CHECK(r.exit_code == 0);
}
