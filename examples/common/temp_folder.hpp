// examples/common/temp_folder.hpp — a private temporary folder (mkdtemp under /tmp) that is
// removed with everything in it when the object goes away, and the examples' database file: the
// --db path as given, or a file in such a folder, so a run leaves nothing behind unless --db
// names a file.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <system_error>

namespace example {

/// A new folder /tmp/<prefix>-XXXXXX, removed (recursively) on destruction. Not copyable.
class temp_folder {
 public:
  /// Creates the folder; on failure prints the reason (perror) and ok() is false.
  explicit temp_folder(const std::string& prefix) {
    std::string name = "/tmp/" + prefix + "-XXXXXX";
    if (::mkdtemp(name.data()) == nullptr) {
      std::perror("mkdtemp");
      return;
    }
    path_ = name;
  }
  ~temp_folder() {
    if (path_.empty()) return;
    std::error_code ec;  // best effort: a leftover folder is not worth failing the run for
    std::filesystem::remove_all(path_, ec);
  }
  temp_folder(const temp_folder&) = delete;
  temp_folder& operator=(const temp_folder&) = delete;

  bool ok() const noexcept { return !path_.empty(); }
  /// The path of `name` inside the folder.
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

/// The database file of a run: `path` as given (--db), or, when it is empty, the file `name` in a
/// new temp_folder that is removed with this object. Sets `path` to the file either way.
class database_file {
 public:
  database_file(std::string& path, const std::string& prefix, const std::string& name) {
    if (!path.empty()) return;
    folder_.emplace(prefix);
    if (folder_->ok()) path = folder_->file(name);
  }

  /// False if the temporary folder could not be created (the reason was printed).
  bool ok() const noexcept { return !folder_ || folder_->ok(); }
  /// True if the file lives in a temporary folder (no --db was given).
  bool temporary() const noexcept { return folder_.has_value(); }

 private:
  std::optional<temp_folder> folder_;
};

}  // namespace example
