//! The README's SQL cookbook as statements, for the store suite (every query runs and finds
//! rows) and the backfill benchmark (every query's time on a large store).
//!
//! It only reads the text it is given; it never runs SQL.

/// Which SQL dialect a store speaks, as the cookbook marks the lines that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn marker(self) -> &'static str {
        match self {
            Dialect::Sqlite => "-- SQLite",
            Dialect::Postgres => "-- PostgreSQL",
        }
    }
}

/// The statements of the first SQL block after `### Cookbook` in `readme`, in `dialect`: lines
/// marked for the other store dropped, `:id` bound to `id` (quoted), comment-only statements
/// skipped. Each comes with its title, the comment line that opens it (or the previous one's
/// title when a title covers two statements).
pub fn statements(readme: &str, dialect: Dialect, id: &str) -> Vec<(String, String)> {
    let section = &readme[readme.find("### Cookbook").expect("a cookbook section")..];
    let start = section.find("```sql\n").expect("a SQL block") + "```sql\n".len();
    let block = &section[start..start + section[start..].find("```").expect("its end")];
    let other = [Dialect::Sqlite, Dialect::Postgres]
        .into_iter()
        .find(|d| *d != dialect)
        .map(Dialect::marker)
        .unwrap_or_default();
    let kept: String = block
        .lines()
        .filter(|line| !line.trim_end().ends_with(other))
        .map(|line| format!("{line}\n"))
        .collect();
    let mut title = String::new();
    kept.split(";\n")
        .filter_map(|statement| {
            if let Some(comment) = statement
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .and_then(|l| l.strip_prefix("-- "))
            {
                title = comment.to_owned();
            }
            statement
                .lines()
                .any(|l| !l.trim_start().starts_with("--") && !l.trim().is_empty())
                .then(|| {
                    (
                        title.clone(),
                        statement.trim().replace(":id", &format!("'{id}'")),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_dialect_keeps_its_own_lines_and_titles_carry_over() {
        let readme = "# x\n### Cookbook\ntext\n```sql\n-- One\nSELECT a,\n  b -- SQLite\n  c -- PostgreSQL\nFROM t WHERE id = :id;\nSELECT 2;\n\n-- Two\nSELECT 3;\n```\nafter\n";
        assert_eq!(
            statements(readme, Dialect::Postgres, "e-1"),
            [
                (
                    "One".to_owned(),
                    "-- One\nSELECT a,\n  c -- PostgreSQL\nFROM t WHERE id = 'e-1'".to_owned()
                ),
                ("One".to_owned(), "SELECT 2".to_owned()),
                ("Two".to_owned(), "-- Two\nSELECT 3".to_owned()),
            ]
        );
        assert!(
            statements(readme, Dialect::Sqlite, "x")[0]
                .1
                .contains("b -- SQLite")
        );
    }
}
